"""The lock behaviours both flavours of the Python API share, run over both:
the blocking Locker (a renewal thread) and the Twisted TxLocker (the
reactor), against the real server, some through a Relay (a real proxy that
answers garbage or holds a request in flight).

Both drive the same plans with the same driver (distributex.client.plans);
these tests check that each flavour's sending, sleeping and stopping carry
them out alike.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from clientfixtures import (  # noqa: F401  (relay_fixture: the fixture relay)
    LONG,
    SHORT,
    Relay,
    assert_pool_free,
    held_by,
    hosts,
    relay_fixture,
    release,
    sessions,
    spin_until,
    start_dx,
    steal,
    wait_for,
    wait_until,
)
from servers import DistributexServer, free_port
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred

from distributex.client import (
    LockBusy,
    Locker,
    LockLost,
    LockTimeout,
    ServerUnreachable,
    TxLocker,
)

pytestmark = pytest.mark.timeout(60)

# Pools enough for every test of either flavour, one each: a test must not
# see what another left behind.
POOLS_PER_LEASE = 40


@pytest.fixture(scope="module", name="dx")
def dx_server() -> Iterator[DistributexServer]:
    pools = ([{"name": f"long-{i}", "expire": LONG} for i in range(POOLS_PER_LEASE)]
             + [{"name": f"short-{i}", "expire": SHORT} for i in range(POOLS_PER_LEASE)])
    server = start_dx(tempfile.mkdtemp(prefix="dx-drivers-"), pools)
    yield server
    server.kill()


_numbers = itertools.count()


@pytest.fixture
def long_pool() -> str:
    """A pool of its own for the test, with a lease that never runs out in it."""
    return f"long-{next(_numbers)}"


@pytest.fixture
def short_pool() -> str:
    """A pool of its own for the test, with a lease of SHORT seconds."""
    return f"short-{next(_numbers)}"


class Call:
    """A call running in a thread of its own (the blocking flavour's pending call)."""

    def __init__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._outcome: List[Any] = []
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs),
                                        daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            self._outcome.append((True, function(*args, **kwargs)))
        except BaseException as error:
            self._outcome.append((False, error))

    def done(self) -> bool:
        return bool(self._outcome)

    def result(self, timeout: float = 30) -> Any:
        self._thread.join(timeout)
        if not self._outcome:
            raise AssertionError(f"no result after {timeout} s")
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


class Blocking:
    """The blocking flavour: calls in threads, waits by polling."""

    def locker(self, url: str, host: Optional[str] = None) -> Locker:
        return Locker(url, host=host)

    def start(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
        return Call(function, *args, **kwargs)

    def done(self, call: Call) -> bool:
        return call.done()

    def wait(self, call: Call) -> Any:
        return call.result()

    def wait_until(self, predicate: Callable[[], Any], what: str = "",
                   timeout: float = 10.0) -> Any:
        return wait_until(predicate, timeout, what)

    def lost(self, held: Any) -> bool:
        return bool(held.lost.is_set())

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.wait(self.start(function, *args, **kwargs))


class Twisted(Blocking):
    """The Twisted flavour: Deferreds, waited for by running the reactor."""

    def locker(self, url: str, host: Optional[str] = None) -> TxLocker:  # type: ignore[override]
        return TxLocker(url, reactor, host=host)

    def start(self, function: Callable[..., Any], *args: Any,  # type: ignore[override]
              **kwargs: Any) -> Deferred:
        return maybeDeferred(function, *args, **kwargs)

    def done(self, call: Deferred) -> bool:  # type: ignore[override]
        return bool(call.called)

    def wait(self, call: Deferred) -> Any:  # type: ignore[override]
        return wait_for(call)

    def wait_until(self, predicate: Callable[[], Any], what: str = "",
                   timeout: float = 10.0) -> Any:
        return spin_until(predicate, timeout, what)

    def lost(self, held: Any) -> bool:
        return bool(held.lost)


@pytest.fixture(params=[Blocking(), Twisted()], ids=["blocking", "twisted"])
def flavour(request: pytest.FixtureRequest) -> Blocking:
    return request.param


def renewals(relay: Relay) -> int:
    return relay.paths().count("/get/")


# -- a whole cycle -------------------------------------------------------------------

def test_a_lock_is_held_renewed_in_one_session_and_released(flavour, dx, relay, short_pool):
    held = flavour.run(flavour.locker(relay.url, host="api1").acquire, short_pool,
                       label="nightly backup")
    [holder] = dx.status(short_pool)["holders"]
    assert (holder["host"], holder["session"], holder["label"], holder["token"]) == (
        "api1", held.session, "nightly backup", held.token)
    # Three renewals asked, two answered at least: more than a lease went by.
    flavour.wait_until(lambda: renewals(relay) >= 3 or flavour.lost(held), "renewals")
    assert not flavour.lost(held)
    held.check()
    [holder] = dx.status(short_pool)["holders"]
    assert (holder["host"], holder["token"]) == ("api1", held.token)
    flavour.run(held.release)
    flavour.run(held.release)  # a second time does nothing
    assert_pool_free(dx, short_pool)
    requests = relay.requests()
    assert [path for path, _ in requests][-1] == "/release/"
    # One acquisition, one session: the wait, every renewal and the release.
    assert {params["session"] for _, params in requests} == {held.session}


def test_each_acquisition_has_a_fresh_session(flavour, dx, long_pool):
    locker = flavour.locker(dx.url, host="api1")
    first = flavour.run(locker.acquire, long_pool)
    flavour.run(first.release)
    second = flavour.run(locker.acquire, long_pool)
    flavour.run(second.release)
    assert first.session != second.session
    assert len(first.session) >= 16 and first.session.isalnum()
    assert_pool_free(dx, long_pool)


# -- identity: (host, session) -----------------------------------------------------

def test_lockers_with_one_host_name_hold_one_at_a_time(flavour, dx, long_pool):
    lockers = [flavour.locker(dx.url, host="same") for _ in range(3)]
    pending = [flavour.start(locker.acquire, long_pool) for locker in lockers]
    seen = set()
    while pending:
        def settled() -> bool:
            granted = sum(flavour.done(call) for call in pending)
            queued = len(hosts(dx, long_pool, "waiters"))
            return granted > 1 or (granted == 1 and queued == len(pending) - 1)

        flavour.wait_until(settled, "one grant, the others queued")
        granted = [call for call in pending if flavour.done(call)]
        assert len(granted) == 1, "two lockers of one host held the pool at once"
        held = flavour.wait(granted[0])
        assert sessions(dx, long_pool, "same") == [held.session]
        seen.add(held.session)
        flavour.run(held.release)
        pending.remove(granted[0])
    assert len(seen) == 3
    assert_pool_free(dx, long_pool)


# -- not obtained ------------------------------------------------------------------

def test_a_busy_pool_times_out_or_is_skipped_and_leaves_no_waiter(flavour, dx, long_pool):
    locker = flavour.locker(dx.url, host="me")
    with held_by(dx, long_pool):
        with pytest.raises(LockTimeout, match="timed out after 0.3 s"):
            flavour.run(locker.acquire, long_pool, timeout=0.3)
        with pytest.raises(LockBusy):
            flavour.run(locker.acquire, long_pool, nowait=True)
        assert hosts(dx, long_pool, "waiters") == []
    assert_pool_free(dx, long_pool)


def test_an_unreachable_server_raises_server_unreachable(flavour):
    locker = flavour.locker(f"http://127.0.0.1:{free_port()}", host="me")
    with pytest.raises(ServerUnreachable):
        flavour.run(locker.acquire, "pool", timeout=0.5)


# -- lost --------------------------------------------------------------------------

def test_a_renewal_answered_no_is_a_loss(flavour, dx, short_pool):
    held = flavour.run(flavour.locker(dx.url, host="victim").acquire, short_pool)
    steal(dx, short_pool, "victim")
    flavour.wait_until(lambda: flavour.lost(held), "the loss")
    assert "answered NO" in str(held.lost_reason)
    with pytest.raises(LockLost):
        held.check()
    flavour.run(held.release)  # releases nothing of the thief's
    assert hosts(dx, short_pool) == ["thief"]
    release(dx, short_pool, "thief")
    assert_pool_free(dx, short_pool)


GARBAGE: Dict[str, bytes] = {
    "a proxy's page": (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                       b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"),
    "ERROR": (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 5\r\nConnection: close\r\n\r\nERROR"),
    "not HTTP": b"hello\r\n\r\n",
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_renewals_answered_with_garbage_end_in_a_loss_after_a_lease(
        flavour, dx, relay, short_pool, garbage):
    held = flavour.run(flavour.locker(relay.url, host="h").acquire, short_pool)
    relay.answer = garbage  # from now on the proxy answers every request so
    flavour.wait_until(lambda: flavour.lost(held), "the loss", timeout=10 * SHORT)
    assert "no renewal succeeded for a whole lease" in str(held.lost_reason)
    assert renewals(relay) >= 2  # retried, not given up on at the first garbage
    release(dx, short_pool, "h", held.session)  # the proxy would answer garbage
    assert_pool_free(dx, short_pool)


def test_an_unexpected_error_in_a_renewal_declares_the_lock_lost(flavour, dx, short_pool):
    locker = flavour.locker(dx.url, host="h")
    real_fetch = locker.fetch

    def fetch(request: Any) -> Any:
        if request.path == "/get/":
            raise RuntimeError("a bug in the request code")
        return real_fetch(request)

    locker.fetch = fetch  # type: ignore[method-assign]
    held = flavour.run(locker.acquire, short_pool)
    flavour.wait_until(lambda: flavour.lost(held), "the loss", timeout=10 * SHORT)
    assert "unexpected error" in str(held.lost_reason)
    assert "a bug in the request code" in str(held.lost_reason)
    flavour.run(held.release)
    assert_pool_free(dx, short_pool)


# -- released ----------------------------------------------------------------------

def test_a_release_during_a_renewal_follows_it_and_ends_the_renewals(
        flavour, dx, relay, short_pool):
    held = flavour.run(flavour.locker(relay.url, host="h").acquire, short_pool)
    relay.hold()
    flavour.wait_until(lambda: renewals(relay) == 1, "a renewal in flight")
    releasing = flavour.start(held.release)
    wait_until(lambda: held.released, what="the release asked")
    relay.let_go()
    flavour.wait(releasing)
    assert relay.paths() == ["/wait/", "/get/", "/release/"]
    assert_pool_free(dx, short_pool)
    # Nothing renews any more: a renewal would come within a third of the lease.
    flavour.run(lambda: _pause(flavour, SHORT / 2))
    assert relay.paths()[-1] == "/release/"


def _pause(flavour: Blocking, seconds: float) -> Any:
    if isinstance(flavour, Twisted):
        from twisted.internet import task

        return task.deferLater(reactor, seconds, lambda: None)
    threading.Event().wait(seconds)
    return None
