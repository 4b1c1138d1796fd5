"""The blocking Python API: ``Locker(url).lock(pool)`` as a context manager.

Standard library only and no reactor, so that it fits a plain script and
the command wrapper's fast start; a background thread renews the lease.
"""

from __future__ import annotations

import threading
import time

from distributex.client.address import parse_servers
from distributex.client.errors import DistributexError, ServerUnreachable
from distributex.client.held import Held
from distributex.client.plans import (
    acquire_plan,
    drive,
    release_plan,
    renewal_plan,
    run_blocking,
)
from distributex.client.protocol import default_host, new_session
from distributex.client.threads import start_without_signals
from distributex.client.wire import fetch

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Generator
    from types import TracebackType

    from distributex.client.address import ServerAddress
    from distributex.client.plans import Step
    from distributex.client.protocol import Answer, Grant, Request


class Locker:
    """A client of one distributex server, for code without a reactor.

    ::

        locker = Locker("http://dx.example.com:9889")
        with locker.lock("pool1", label="nightly backup", timeout=600) as held:
            for item in work:
                held.check()                  # raises LockLost once lost
                store(item, fence=held.token)

    A held lock can be lost. When this process stops reaching the server
    (a network partition, a paused VM, a server restart) the server hands
    the pool to somebody else once the lease runs out. ``held.lost`` is a
    :class:`threading.Event` set at that moment, ``held.check()`` raises
    :class:`~distributex.client.errors.LockLost`, and leaving the ``with``
    block raises ``LockLost`` if the lock was lost inside it. Pass
    ``held.token`` to the resource so it can refuse an older holder's writes.

    ``url`` is ``http[s]://host:port`` (or a bare host name, port 9889);
    ``host`` is the identity sent as holder, by default this machine's FQDN.
    ``url`` may list several servers of one cluster, ``a,b,c``: one that
    cannot be reached is passed over for the next, and the one that answered
    is kept for the renewals and the release; ``unix:/path`` is a server on
    a Unix socket. ``secret`` is sent as ``Authorization: Bearer`` on every
    request; ``ssl_context`` verifies https servers (default: the system's
    certificate store) and may carry a client certificate.
    Each acquisition also sends a fresh random session (``held.session``),
    so two locks taken with one host name, in two threads or two processes,
    exclude each other as locks of two hosts would.
    """

    def __init__(self, url: str | list[ServerAddress], *, host: str | None = None,
                 secret: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.addresses = parse_servers(url) if isinstance(url, str) else list(url)
        if not self.addresses:
            raise ValueError("no server given")
        # The server that answered last: used until it cannot be reached.
        self._current = 0
        self.host = host
        self.secret = secret
        self.ssl_context = ssl_context
        # The locks acquired and not yet released, so that release_all()
        # finds even one whose acquire() was interrupted before returning it.
        self._held: list[HeldLock] = []

    def lock(self, pool: str, host: str | None = None, label: str | None = None,
             timeout: float | None = None, nowait: bool = False) -> HeldLock:
        """Wait for the lock on ``pool``; the held lock is a context manager.

        ``timeout`` seconds, or forever (bar an unreachable server, given up
        on after 30 s) when None: :class:`~.errors.LockTimeout`. ``nowait``
        tries once: :class:`~.errors.LockBusy` when somebody holds it. An
        unreachable server raises :class:`~.errors.ServerUnreachable`, a
        refused request :class:`~.errors.InvalidRequest`.
        """
        return self.acquire(pool, host, label, timeout, nowait)

    def acquire(self, pool: str, host: str | None = None, label: str | None = None,
                timeout: float | None = None, nowait: bool = False) -> HeldLock:
        """The same as :meth:`lock`; release the result with ``release()``."""
        host = host or self.host or default_host()
        session = new_session()
        plan = acquire_plan(pool, host, clock=time.monotonic, label=label,
                            timeout=timeout, nowait=nowait, session=session)
        try:
            grant = run_blocking(drive(plan, self.fetch, time.sleep))
            assert grant is not None  # only a stop ends a plan early, and nothing stops this one
            return HeldLock(self, pool, host, session, label, grant)
        except DistributexError:
            raise  # the plan's own failure: nothing was granted
        except BaseException:
            # Interrupted (Ctrl-C, a signal handler) anywhere from the grant
            # to the hand-over of the held lock: nobody would ever release it.
            self._abandon(pool, host, session)
            raise

    @property
    def address(self) -> ServerAddress:
        """The server in use: the one that answered last."""
        return self.addresses[self._current]

    def fetch(self, request: Request) -> Answer:
        """Send one protocol request to this locker's server.

        With several servers (of one cluster), one that cannot be reached
        is passed over for the next, which is kept while it answers.
        """
        first = self._current
        count = len(self.addresses)
        for step in range(count):
            index = (first + step) % count
            try:
                answer = fetch(self.addresses[index], request, self.secret, self.ssl_context)
            except ServerUnreachable as error:
                if error.connected or step == count - 1:
                    raise  # it was reached: the request may have been carried out
                continue
            self._current = index
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self, pool: str, host: str, session: str | None = None) -> None:
        """Tell the server that the holder (``host``, ``session``) no longer
        holds ``pool``. A held lock's own ``release()`` is what to call:
        it also stops the renewals."""
        run_blocking(drive(release_plan(pool, host, session), self.fetch, time.sleep))

    def release_quietly(self, pool: str, host: str, session: str | None = None) -> None:
        """:meth:`release`, for cleanup paths where nothing more can be done."""
        try:
            self.release(pool, host, session)
        except DistributexError:
            pass

    def release_all(self) -> None:
        """Release every lock of this locker not released yet, quietly.

        For a program's last cleanup: it also finds a lock whose
        :meth:`acquire` was interrupted (by a signal) after the grant but
        before it could be returned.
        """
        for held in list(self._held):
            held.release_quietly()

    def _abandon(self, pool: str, host: str, session: str) -> None:
        for held in list(self._held):
            if held.session == session:
                held.release_quietly()  # stops its renewals first
                return
        # Granted, maybe, but no held lock yet: nothing renews, just release.
        self.release_quietly(pool, host, session)


class HeldLock(Held):
    """A lock held on a pool, renewed in the background until released.

    Besides what :class:`~.held.Held` says, ``lost`` is a
    :class:`threading.Event` set when the lock is lost.
    """

    def __init__(self, locker: Locker, pool: str, host: str, session: str,
                 label: str | None, grant: Grant) -> None:
        super().__init__(pool, host, session, label, grant)
        self.lost = threading.Event()
        self._locker = locker
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._callbacks: list[Callable[[str], object]] = []
        self._thread: threading.Thread | None = None
        # Known to the locker before anything can fail or be interrupted.
        locker._held.append(self)
        if grant.expire > 0:
            plan = renewal_plan(pool, host, grant, clock=time.monotonic, label=label,
                                session=session)
            self._thread = threading.Thread(target=self._renew, args=(plan,), daemon=True,
                                            name=f"distributex renewal of {pool}")
            start_without_signals(self._thread)

    def on_lost(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` once the lock is lost (now, if it is).

        It runs in the renewal thread, so it should be quick: set a flag,
        signal a process.
        """
        with self._mutex:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        callback(self.lost_reason or "")

    def release(self) -> None:
        """Stop renewing and give the lock back; a second call does nothing.

        A renewal on its way is waited for (at most a request's timeout),
        since landing after the release it would take the lock again; then
        ``/release/`` is sent. Raises :class:`~.errors.DistributexError`
        when the server could not be told; the lease then runs out by itself.
        """
        if self._released:
            return
        self._released = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():  # not started: interrupted in __init__
            thread.join()
        if self in self._locker._held:
            self._locker._held.remove(self)
        self._locker.release(self.pool, self.host, self.session)

    def release_quietly(self) -> None:
        """:meth:`release`, for cleanup paths where nothing more can be done."""
        try:
            self.release()
        except DistributexError:
            pass

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.release()
        except DistributexError as error:
            # The block's own outcome matters more than a release the lease
            # expiry will make up for; say it, do not mask the outcome.
            import logging

            logging.getLogger(__name__).warning(
                "could not release the lock on pool %r (the lease will run out): %s",
                self.pool, error)
        if exc is None:
            self.check()

    def _renew(self, plan: Generator[Step, Answer | None, str]) -> None:
        try:
            reason = run_blocking(drive(plan, self._locker.fetch, self._stop.wait,
                                        self._stop.is_set))
        except BaseException as error:
            # A bug, not an outage (the plan handles those). Nothing renews
            # any more, so the lock is as good as lost: say so, rather than
            # let the work go on unprotected.
            reason = f"the renewal stopped on an unexpected error: {error!r}"
        if reason is None:
            return  # released
        with self._mutex:
            self.lost_reason = str(reason)
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self.lost_reason)
