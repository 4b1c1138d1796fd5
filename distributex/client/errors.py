"""The exceptions of the distributex client, shared by every flavour of it.

Everything the client raises on purpose is a :class:`DistributexError`, so a
caller can catch the family at once, or a single case:

- :class:`LockNotObtained` (and its :class:`LockBusy` and :class:`LockTimeout`):
  the server works, somebody else holds the lock;
- :class:`ServerUnreachable`, :class:`InvalidRequest`, :class:`ServerError`,
  :class:`ProtocolError`: the lock could not even be asked for;
- :class:`LockLost`: a lock that was held is no longer.
"""

from __future__ import annotations


class DistributexError(Exception):
    """Base class of every error the distributex client raises."""


class LockNotObtained(DistributexError):
    """The server answered ``NO``: somebody else holds the lock."""


class LockBusy(LockNotObtained):
    """A single try (``nowait``) found the lock held by somebody else."""


class LockTimeout(LockNotObtained, TimeoutError):
    """The lock was not granted before the timeout passed."""


class ServerUnreachable(DistributexError, ConnectionError):
    """The server could not be reached, or did not answer in time.

    ``connected`` says whether a connection was made before the failure (the
    server went away, or stopped answering, while we talked to it): patience
    with an unreachable server counts from the last time it was reachable.
    """

    def __init__(self, message: str, connected: bool = False) -> None:
        super().__init__(message)
        self.connected = connected


class InvalidRequest(DistributexError):
    """The server answered ``INVALID``: the request itself was refused.

    ``status`` is the HTTP status (400, 403, 404 or 405) and ``reason`` the
    server's one-sentence explanation from ``X-Distributex-Reason``.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"server refused the request (HTTP {status}): {reason}")
        self.status = status
        self.reason = reason


class ServerError(DistributexError):
    """The server answered ``ERROR``: its lock backend cannot be reached."""


class ProtocolError(DistributexError):
    """The answer was none of those the distributex protocol allows."""


class LockLost(DistributexError):
    """A lock that was held was lost: it may already belong to someone else."""


class TLSFailure(DistributexError):
    """The TLS handshake with the server failed: its certificate did not
    verify (wrong CA, expired, another name), or it wanted a client
    certificate that was not given. Not retried: it will not heal."""
