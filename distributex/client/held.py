"""What every flavour of held lock has: the grant, and loss as a state."""

from __future__ import annotations

from distributex.client.errors import LockLost

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    from distributex.client.protocol import Grant


class Held:
    """A lock held on ``pool`` by the holder (``host``, ``session``).

    ``session`` is the random session of this acquisition, ``token`` the
    fencing token of the grant, ``expire`` its lease in seconds (0: it never
    expires and is not renewed), and ``lost_reason`` says why the lock was
    lost, or is None while it is not.
    """

    def __init__(self, pool: str, host: str, session: str, label: str | None,
                 grant: Grant) -> None:
        self.pool = pool
        self.host = host
        self.session = session
        self.label = label
        self.token = grant.token
        self.expire = grant.expire
        self.lost_reason: str | None = None
        self._released = False

    @property
    def released(self) -> bool:
        """Whether ``release()`` has been called (it may still be under way)."""
        return self._released

    def check(self) -> None:
        """Raise :class:`~.errors.LockLost` if the lock has been lost."""
        if self.lost_reason is not None:
            raise self.loss()

    def loss(self) -> LockLost:
        """The error that says the lock was lost, and why."""
        return LockLost(f"the lock on pool {self.pool!r} was lost: {self.lost_reason}")

    def __repr__(self) -> str:
        state = ("lost" if self.lost_reason is not None
                 else "released" if self._released else "held")
        return f"<{type(self).__name__} {self.pool!r} by {self.host!r} token={self.token} {state}>"
