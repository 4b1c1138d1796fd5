"""The Twisted flavour of the Python API: Deferreds, on treq.

For programs that already run a reactor. It drives the same plans as the
blocking :class:`~distributex.client.locker.Locker` (:mod:`.plans`), so it
retries, renews, stops and declares a lock lost the same way. Its pauses are
the reactor's ``callLater``; the plans read the time from ``clock``,
``time.monotonic`` by default, not from ``reactor.seconds``: that is the wall
clock, and a step of it (NTP, an administrator) would end a lease at once or
stretch it past the server's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar, cast

from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

from distributex.client.address import ServerAddress, parse_servers
from distributex.client.errors import DistributexError, ServerUnreachable, TLSFailure
from distributex.client.held import Held
from distributex.client.plans import acquire_plan, drive, release_plan, renewal_plan
from distributex.client.protocol import Answer, Grant, Request, default_host, new_session
from distributex.client.wire import USER_AGENT

T = TypeVar("T")

_log = Logger()


class DelayedCall(Protocol):
    """What the client uses of ``IDelayedCall`` (typed without a zope plugin)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ReactorTime(Protocol):
    """What the client uses of ``IReactorTime``."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall: ...

# The failures of a request that never connected.
_CONNECT_ERRORS = (neterror.ConnectError, neterror.DNSLookupError)
# What a request that could not reach the server, or got no answer, fails
# with; anything else is a bug and is not disguised as an outage.
_TRANSPORT_ERRORS = (neterror.ConnectError, neterror.ConnectionLost, neterror.ConnectionDone,
                     ResponseFailed, RequestTransmissionFailed, OSError)


class TxLocker:
    """A client of one distributex server for Twisted programs.

    ::

        locker = TxLocker("http://dx.example.com:9889")
        held = yield locker.acquire("pool1", label="nightly backup", timeout=600)
        try:
            yield do_the_work(fence=held.token)
            held.check()            # raises LockLost once lost
        finally:
            yield held.release()

    or ``locker.run_locked("pool1", work)``, which calls ``work(held)``,
    cancels its Deferred if the lock is lost, and always releases.

    A held lock can be lost (see :class:`~distributex.client.locker.Locker`):
    ``held.when_lost()`` fires with the reason, ``held.lost`` says it, and
    ``held.token`` lets the resource refuse an older holder's writes. Each
    acquisition sends a fresh random session (``held.session``), as the
    blocking ``Locker`` does.

    ``secret`` is sent as ``Authorization: Bearer`` on every request.

    An https server is verified against the CA certificates of the PEM
    file ``cacert`` (default: the system's store); ``cert`` (and ``key``,
    when the key is not in it) is the client certificate.

    ``url`` may list several servers of one cluster, ``a,b,c``, as for
    :class:`~distributex.client.locker.Locker`.

    ``clock`` gives the plans the time (leases, deadlines, retries): a
    monotonic clock by default; a test may pass ``task.Clock().seconds``.
    """

    def __init__(self, url: str, reactor: IReactorTime | None = None, *,
                 host: str | None = None, http_client: HTTPClient | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 secret: str | None = None, cacert: str | None = None,
                 cert: str | None = None, key: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.addresses = parse_servers(url)
        if any(address.scheme == "unix" for address in self.addresses):
            raise ValueError("TxLocker does not speak to Unix sockets yet; use Locker")
        # The server that answered last: used until it cannot be reached.
        self._current = 0
        self.host = host
        self.secret = secret
        self.clock = clock
        self.reactor = cast(ReactorTime, reactor)
        # Agent's default pool closes each connection after its answer, as the
        # blocking client does: a lock takes a request every few minutes.
        if http_client is None:
            if cacert or cert:
                agent = Agent(reactor, contextFactory=_TLSPolicy(cacert, cert, key))
            else:
                agent = Agent(reactor)
            http_client = HTTPClient(cast(IAgent, agent))
        self._http = http_client

    def acquire(self, pool: str, host: str | None = None, label: str | None = None,
                timeout: float | None = None, nowait: bool = False) -> Deferred[TxHeldLock]:
        """Wait for the lock on ``pool``; a Deferred of the held lock.

        Fails as :meth:`Locker.lock <distributex.client.locker.Locker.lock>`
        raises: ``LockTimeout``, ``LockBusy``, ``ServerUnreachable``,
        ``InvalidRequest``... Cancelling it gives up the wait.
        """
        host = host or self.host or default_host()
        session = new_session()
        plan = acquire_plan(pool, host, clock=self.clock, label=label,
                            timeout=timeout, nowait=nowait, session=session)
        waiting = inlineCallbacks(drive)(plan, self.fetch, self._sleep)

        def granted(grant: Grant | None) -> TxHeldLock:
            assert grant is not None  # only a stop ends a plan early, and nothing stops this one
            return TxHeldLock(self, pool, host, session, label, grant)

        def failed(failure: Failure) -> Failure:
            if not failure.check(DistributexError):
                # Cancelled or broken mid-wait (or a bug in granted()): the
                # server may have granted, and nobody would ever release it.
                self.release(pool, host, session).addErrback(lambda _: None)
            return failure

        return waiting.addCallback(granted).addErrback(failed)

    def release(self, pool: str, host: str, session: str | None = None) -> Deferred[None]:
        """Tell the server that the holder (``host``, ``session``) no longer
        holds ``pool``. A held lock's own ``release()`` is what to call: it
        also stops the renewals."""
        return inlineCallbacks(drive)(release_plan(pool, host, session), self.fetch,
                                      self._sleep)

    def run_locked(self, pool: str, work: Callable[[TxHeldLock], Any], *,
                   host: str | None = None, label: str | None = None,
                   timeout: float | None = None, nowait: bool = False) -> Deferred[Any]:
        """Call ``work(held)`` under the lock; a Deferred of its result.

        The lock is released however the work ends. If the lock is lost
        first, the work's Deferred is cancelled; if it was lost at any time
        during the work, the result is a ``LockLost`` failure.
        """
        return self._run_locked(pool, work, host, label, timeout, nowait)

    @inlineCallbacks
    def _run_locked(self, pool: str, work: Callable[[TxHeldLock], Any], host: str | None,
                    label: str | None, timeout: float | None,
                    nowait: bool) -> Generator[Deferred[Any], Any, Any]:
        held = yield self.acquire(pool, host, label, timeout, nowait)
        working = maybeDeferred(work, held)
        loss = held.when_lost()
        loss.addCallback(lambda _: working.cancel())  # the lock is gone: stop
        loss.addErrback(lambda failure: failure.trap(CancelledError))
        try:
            result = yield working
        except Exception as failure:
            if held.lost:
                raise held.loss() from failure
            raise
        finally:
            loss.cancel()
            yield held.release()
        held.check()
        return result

    @property
    def address(self) -> ServerAddress:
        """The server in use: the one that answered last."""
        return self.addresses[self._current]

    def fetch(self, request: Request) -> Deferred[Answer]:
        """Send one protocol request; a Deferred of the answer.

        With several servers (of one cluster), one that cannot be reached
        is passed over for the next, which is kept while it answers.
        """
        first = self._current
        count = len(self.addresses)

        def attempt(step: int) -> Deferred[Answer]:
            index = (first + step) % count

            def answered(answer: Answer) -> Answer:
                self._current = index
                return answer

            def failed(failure: Failure) -> Deferred[Answer] | Failure:
                error = failure.value
                if (isinstance(error, ServerUnreachable) and not error.connected
                        and step < count - 1):
                    return attempt(step + 1)
                return failure

            return self._fetch_from(self.addresses[index], request).addCallbacks(
                answered, failed)

        return attempt(0)

    def _fetch_from(self, address: ServerAddress, request: Request) -> Deferred[Answer]:
        url = address.url + request.target()
        headers = Headers({b"Accept": [b"text/plain"], b"User-Agent": [USER_AGENT.encode()]})
        if self.secret:
            headers.addRawHeader(b"Authorization", f"Bearer {self.secret}".encode())
        answering: Deferred[Answer] = self._http.get(url, headers=headers).addCallback(
            _read_answer)
        timed_out = []
        if request.timeout is not None:
            # By hand, not addTimeout: the Agent reports the cancel as its own
            # failure, which addTimeout would not recognise as a timeout.
            def give_up() -> None:
                timed_out.append(True)
                answering.cancel()

            def answered(result: object) -> object:
                if timer.active():
                    timer.cancel()
                return result

            timer = self.reactor.callLater(request.timeout, give_up)
            answering.addBoth(answered)

        def unreachable(failure: Failure) -> Failure:
            if timed_out:
                raise ServerUnreachable(f"no answer from {address.url} in "
                                        f"{request.timeout:g} s")
            if _cancelled(failure):
                # Our caller gave up: not an outage, and not to be retried.
                raise CancelledError()
            tls = _tls_failure(failure)
            if tls is not None:
                raise TLSFailure(f"TLS with {address.url} failed: {tls}")
            if failure.check(*_TRANSPORT_ERRORS):
                raise ServerUnreachable(f"cannot reach {address.url}: "
                                        f"{_describe(failure)}",
                                        connected=not failure.check(*_CONNECT_ERRORS))
            return failure

        return answering.addErrback(unreachable)

    def _sleep(self, seconds: float) -> Deferred[None]:
        sleeping: Deferred[None] = Deferred(lambda d: call.cancel())
        call = self.reactor.callLater(seconds, sleeping.callback, None)
        return sleeping


class TxHeldLock(Held):
    """A lock held on a pool, renewed by the reactor until released.

    Besides what :class:`~.held.Held` says, ``lost`` is whether it has been
    lost and :meth:`when_lost` fires when it is.
    """

    def __init__(self, locker: TxLocker, pool: str, host: str, session: str,
                 label: str | None, grant: Grant) -> None:
        super().__init__(pool, host, session, label, grant)
        self._locker = locker
        self._loss_waiters: list[Deferred[str]] = []
        self._wake: tuple[Deferred[None], DelayedCall] | None = None
        self._renewing: Deferred[Any] = succeed(None)
        if grant.expire > 0:
            plan = renewal_plan(pool, host, grant, clock=locker.clock, label=label,
                                session=session)
            renewing = inlineCallbacks(drive)(plan, locker.fetch, self._sleep,
                                              lambda: self._released)
            self._renewing = renewing.addCallbacks(self._ended, self._broken)

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def when_lost(self) -> Deferred[str]:
        """A Deferred that fires with the reason once the lock is lost.

        It never fires for a lock released in time; cancel it when done.
        """
        if self.lost_reason is not None:
            return succeed(self.lost_reason)
        waiter: Deferred[str] = Deferred(self._loss_waiters.remove)
        self._loss_waiters.append(waiter)
        return waiter

    def release(self) -> Deferred[None]:
        """Stop renewing and give the lock back; a Deferred of its end.

        A renewal on its way is waited for (at most a request's timeout),
        since landing after the release it would take the lock again; then
        ``/release/`` is sent. It fails with a
        :class:`~.errors.DistributexError` when the server could not be
        told; the lease then runs out by itself. A second call does nothing.
        """
        if self._released:
            return succeed(None)
        self._released = True  # the driver sends nothing more
        if self._wake is not None:
            sleeping, call = self._wake
            self._wake = None
            call.cancel()
            sleeping.callback(None)  # the driver sees the stop now, not after the pause
        return self._renewing.addBoth(
            lambda _: self._locker.release(self.pool, self.host, self.session))

    def _sleep(self, seconds: float) -> Deferred[None]:
        sleeping: Deferred[None] = Deferred()
        call = self._locker.reactor.callLater(seconds, self._woken, sleeping)
        self._wake = (sleeping, call)
        return sleeping

    def _woken(self, sleeping: Deferred[None]) -> None:
        self._wake = None
        sleeping.callback(None)

    def _ended(self, reason: str | None) -> None:
        if reason is None:
            return  # released
        self.lost_reason = reason
        waiters, self._loss_waiters = self._loss_waiters, []
        for waiter in waiters:
            waiter.callback(reason)

    def _broken(self, failure: Failure) -> None:
        # A bug, not an outage (the plan handles those). Nothing renews any
        # more, so the lock is as good as lost: say so, rather than let the
        # work go on unprotected.
        _log.failure("the renewal of pool {pool!r} stopped", failure, pool=self.pool)
        self._ended(f"the renewal stopped on an unexpected error: {failure.value!r}")


@inlineCallbacks
def _read_answer(response: Any) -> Generator[Deferred[Any], Any, Answer]:
    body = yield response.content()
    headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1")
               for name, values in response.headers.getAllRawHeaders()}
    return Answer(response.code, body, headers)


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """An ``IPolicyForHTTPS``: the server verified against ``cacert`` (or
    the system's store), ``cert``/``key`` presented as the client's."""

    def __init__(self, cacert: str | None, cert: str | None, key: str | None) -> None:
        from twisted.internet import ssl

        self._trust: Any = None
        if cacert:
            with open(cacert, "rb") as f:
                self._trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(f.read())])
        self._client: Any = None
        if cert:
            with open(cert, "rb") as f:
                pem = f.read()
            if key:
                with open(key, "rb") as f:
                    pem += b"\n" + f.read()
            self._client = ssl.PrivateCertificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                       clientCertificate=self._client)


def _tls_failure(failure: Failure) -> str | None:
    """What went wrong with TLS, when that is why the request failed."""
    from OpenSSL.SSL import Error as TLSError

    reasons = getattr(failure.value, "reasons", None) or [failure]
    for reason in reasons:
        if reason.check(TLSError):
            return str(reason.getErrorMessage())
    return None


def _cancelled(failure: Failure) -> bool:
    # The Agent reports a cancelled request as a ResponseNeverReceived (or
    # a ResponseFailed) whose reasons include the CancelledError.
    reasons = getattr(failure.value, "reasons", None) or [failure]
    return any(reason.check(CancelledError) for reason in reasons)


def _describe(failure: Failure) -> str:
    if failure.check(ResponseFailed, RequestTransmissionFailed):
        reasons = getattr(failure.value, "reasons", None) or [failure]
        return str(reasons[0].getErrorMessage())
    return str(failure.getErrorMessage())
