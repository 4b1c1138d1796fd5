"""The lock algorithms of the client, written once and free of I/O.

A plan is a generator. It yields its next step, a :class:`~.protocol.Request`
to send or a :class:`Sleep`, and is sent back the :class:`~.protocol.Answer`
or has the request's failure thrown in. :func:`drive` carries the steps out,
with blocking calls for :mod:`.locker` and with Deferreds for
:mod:`.txlocker`, and stops them when asked to: both flavours retry, renew,
stop and declare a lock lost in exactly the same way, and the plans are
tested with a fake clock in microseconds.

Every plan names its holder by ``host`` and ``session`` (see
:func:`~.protocol.new_session`): one acquisition's session is used for its
renewals and its release.
"""

from __future__ import annotations

from distributex.client.errors import (
    InvalidRequest,
    LockBusy,
    LockNotObtained,
    LockTimeout,
    ProtocolError,
    ServerError,
    ServerUnreachable,
)
from distributex.client.protocol import Answer, Grant, Request, grant_of, lock_params, verdict

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, TypeVar, Union

    Step = Union[Request, "Sleep"]
    T = TypeVar("T")

# A restarting server listens again within a second: the first retry is soon.
RETRY_FIRST = 0.1
# The longest pause between two tries, so that a server that comes back is
# seen within seconds, while a long outage costs a few requests a minute.
RETRY_MAX = 5.0
# Without a timeout a client waits for the lock as long as it takes, but not
# for a server that does not answer at all: past a restart's few seconds that
# is an outage, better reported (cron mails stderr) than piling up jobs.
UNREACHABLE_PATIENCE = 30.0
# One short question and answer take milliseconds on a LAN; this only keeps
# a server that black-holes packets from stalling a retry or a renewal.
REQUEST_TIMEOUT = 5.0
# How much later than the timeout it was given the server may answer a
# /wait/ before the client stops listening (network and scheduling delays).
WAIT_SLACK = 5.0
# Renew about every third of the lease (the contract): two more tries fit in
# before the lease runs out if one fails.
RENEW_FRACTION = 1 / 3
# Telling the server we are done is one short request; if it cannot be said
# within this, the lease runs out by itself and waiting longer helps nobody.
RELEASE_TIMEOUT = 5.0
# A request needs some time to be worth sending at all.
MIN_REQUEST_TIMEOUT = 0.05


class Sleep:
    """A step: pause ``seconds``; a driver may cut it short to stop the plan."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Sleep({self.seconds:.3f})"


class Backoff:
    """Growing pauses between retries, jittered so that many clients started
    by the same cron minute do not retry in step."""

    def __init__(self, first: float = RETRY_FIRST, maximum: float = RETRY_MAX) -> None:
        self.first = first
        self.maximum = maximum
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        import random  # only paid for when something already failed

        delay = min(self._next, self.maximum) * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self.maximum)
        return delay


def acquire_plan(pool: str, host: str, *, clock: Callable[[], float],
                 label: str | None = None, timeout: float | None = None,
                 nowait: bool = False,
                 session: str | None = None) -> Generator[Step, Answer | None, Grant]:
    """Obtain the lock: one ``/get/`` with ``nowait``, else a ``/wait/``.

    An unreachable server, or one that answers ``ERROR``, is retried with
    backoff until ``timeout`` passes
    (without one, until it has been out of reach for
    :data:`UNREACHABLE_PATIENCE`); with ``nowait`` it is tried once.
    Raises :class:`LockBusy`, :class:`LockTimeout`, :class:`ServerUnreachable`,
    :class:`InvalidRequest`, :class:`ServerError` or :class:`ProtocolError`.
    """
    started = clock()
    deadline = None if timeout is None else started + timeout
    backoff = Backoff()
    failing_since = None
    failure = ""
    tries = 0
    while True:
        sent = clock()
        request = _acquire_request(pool, host, session, label, deadline, sent, nowait)
        tries += 1
        try:
            answer = yield request
            assert answer is not None
            result = verdict(answer)
            if result == "NO" and answer.status == 503:
                raise ServerUnreachable("the server is shutting down", connected=True)
        except (ServerUnreachable, ServerError) as error:
            # ERROR (the server's backend is away for a moment) is retried as
            # an unreachable server is, its patience counted from the first.
            if failing_since is None or (isinstance(error, ServerUnreachable)
                                         and error.connected):
                failing_since = clock()
            give_up = deadline if deadline is not None else failing_since + UNREACHABLE_PATIENCE
            failure = f" (last error: {error})"
            pause = min(backoff.next(), give_up - clock())
            if nowait or pause <= 0:
                if tries > 1:
                    message = f"{error} (tried {tries} times in {clock() - started:.1f} s)"
                    if isinstance(error, ServerError):
                        raise ServerError(message) from None
                    raise ServerUnreachable(message, error.connected) from None
                raise
            yield Sleep(pause)
            continue
        if result == "YES":
            # A /get/ grants (or renews) when it arrives, after it was sent;
            # a /wait/ grant is pushed to us as it happens, so it is dated
            # at its arrival: the oldest instant we know the lease started.
            return grant_of(answer, sent if nowait else clock())
        if result == "NO" and nowait:
            raise LockBusy(f"pool {pool!r} is busy")
        if result == "NO" and timeout is not None:
            raise LockTimeout(f"timed out after {timeout:g} s waiting for pool {pool!r}"
                              f"{failure}")
        if result == "NO":
            raise LockNotObtained(f"the server answered NO to the wait for pool {pool!r}")
        raise ProtocolError(f"unexpected {result} to {request.path}")


def _acquire_request(pool: str, host: str, session: str | None, label: str | None,
                     deadline: float | None, now: float, nowait: bool) -> Request:
    remaining = None if deadline is None else max(0.0, deadline - now)
    if nowait:
        patience = REQUEST_TIMEOUT if remaining is None else min(REQUEST_TIMEOUT, remaining)
        return Request("/get/", lock_params(pool, host, label, session=session),
                       max(MIN_REQUEST_TIMEOUT, patience))
    return Request("/wait/", lock_params(pool, host, label, remaining, session),
                   None if remaining is None else remaining + WAIT_SLACK)


def renewal_plan(pool: str, host: str, grant: Grant, *, clock: Callable[[], float],
                 label: str | None = None,
                 session: str | None = None) -> Generator[Step, Answer | None, str]:
    """Keep the lease of ``grant`` alive; return why the lock was lost.

    Renews with ``/get/`` (re-entrant: ``YES`` with the same token renews)
    every :data:`RENEW_FRACTION` of the lease, sooner after a failure. The
    lock is lost when a renewal answers ``NO`` or ``INVALID``, when it comes
    back with another token (the lease had lapsed meanwhile), or when none
    has succeeded for a whole lease by ``clock``. A renewal that fails
    otherwise (unreachable, ``ERROR``, an answer that is not the protocol's,
    such as a proxy's page) is retried. Never returns for a lease that does
    not expire (``expire`` 0): do not run it for one.
    """
    interval = grant.expire * RENEW_FRACTION
    backoff = Backoff(maximum=interval)
    last_ok = grant.granted_at
    next_try = last_ok + interval
    failure = ""
    while True:
        deadline = last_ok + grant.expire
        now = clock()
        if now >= deadline:
            return f"no renewal succeeded for a whole lease of {grant.expire:g} s{failure}"
        if now < min(next_try, deadline):
            yield Sleep(min(next_try, deadline) - now)
            continue
        try:
            answer = yield Request("/get/", lock_params(pool, host, label, session=session),
                                   max(MIN_REQUEST_TIMEOUT, min(REQUEST_TIMEOUT, deadline - now)))
            assert answer is not None
            result = verdict(answer)
            if result not in ("YES", "NO"):
                raise ProtocolError(f"unexpected {result} to a renewal")
            token = grant_of(answer, now).token if result == "YES" else None
        except InvalidRequest as error:
            return f"the server refused the renewal: {error.reason}"
        except (ServerUnreachable, ServerError, ProtocolError) as error:
            failure = f" (last error: {error})"
            next_try = clock() + backoff.next()
            continue
        if result == "NO":
            return "the server answered NO to a renewal: another holder has it"
        if token != grant.token:
            return (f"the lease had lapsed: the renewal was a new grant "
                    f"(token {token}, not {grant.token})")
        # The server renewed after we sent, so the lease runs at least until
        # now + expire: counting from the send keeps our deadline the earlier.
        last_ok = now
        next_try = now + interval
        failure = ""
        backoff.reset()


def release_plan(pool: str, host: str,
                 session: str | None = None) -> Generator[Step, Answer | None, None]:
    """Give the lock back: one ``/release/``, answered ``OK`` even when the
    hold had already ended. An unreachable server is not retried: the lease
    will end the hold anyway."""
    answer = yield Request("/release/", lock_params(pool, host, session=session),
                           RELEASE_TIMEOUT)
    assert answer is not None
    result = verdict(answer)
    if result != "OK":
        raise ProtocolError(f"unexpected {result} to a release")


def drive(plan: Generator[Step, Answer | None, T], send: Callable[[Request], Any],
          sleep: Callable[[float], Any],
          stopped: Callable[[], bool] = lambda: False) -> Generator[Any, Any, T | None]:
    """Carry out a plan's steps; a generator that yields what ``send`` and
    ``sleep`` return and is resumed with their results.

    With blocking ``send`` and ``sleep`` run it with :func:`run_blocking`;
    with Deferred-returning ones, with ``inlineCallbacks``. Whatever ``send``
    raises is thrown into the plan, which alone knows what a failure means
    at its step (a renewal retries what an acquisition gives up on).

    ``stopped`` is asked before every step: once it says True, no request
    is sent any more, a request on its way is waited for but its answer is
    dropped, the plan is closed and the result is None. ``sleep`` should
    return early when stopping is asked (an Event's wait, a delay that can
    be fired early), so that a stop need not wait out a pause.
    """
    answer: Answer | None = None
    error: Exception | None = None
    while True:
        if stopped():
            plan.close()
            return None
        try:
            step = plan.throw(error) if error is not None else plan.send(answer)
        except StopIteration as done:
            return done.value
        answer, error = None, None
        if isinstance(step, Sleep):
            yield sleep(step.seconds)
            continue
        try:
            answer = yield send(step)
        except Exception as failure:  # not BaseException: Ctrl-C is not an answer
            error = failure


def run_blocking(driver: Generator[Any, Any, T]) -> T:
    """Run a :func:`drive` whose ``send`` and ``sleep`` block: its result."""
    value = None
    while True:
        try:
            value = driver.send(value)
        except StopIteration as done:
            return done.value
