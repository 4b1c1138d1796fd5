"""The Twisted flavour (TxLocker) against the real server: what only it has
(cancellation, run_locked, its clock). What both flavours share is in
test_client_drivers.py.

The reactor runs in the test's thread while a test waits for it (wait_for,
spin_until in clientfixtures).
"""

from __future__ import annotations

import tempfile
from typing import Any, Iterator

import pytest
from clientfixtures import (  # noqa: F401  (relay_fixture: the fixture relay)
    LONG,
    SHORT,
    assert_pool_free,
    held_by,
    hosts,
    relay_fixture,
    release,
    spin_until,
    start_dx,
    steal,
    wait_for,
)
from servers import DistributexServer
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred

from distributex.client.errors import LockLost
from distributex.client.txlocker import TxLocker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", name="dx")
def dx_server() -> Iterator[DistributexServer]:
    pools = ([{"name": name, "expire": LONG} for name in ("tx", "tx-busy")]
             + [{"name": name, "expire": SHORT} for name in ("tx-run", "tx-clock", "tx-step")])
    server = start_dx(tempfile.mkdtemp(prefix="dx-tx-"), pools)
    yield server
    server.kill()


def test_cancelling_a_wait_leaves_the_queue(dx):
    with held_by(dx, "tx-busy"):
        waiting = TxLocker(dx.url, reactor, host="patient").acquire("tx-busy")
        spin_until(lambda: hosts(dx, "tx-busy", "waiters") == ["patient"], what="queued")
        waiting.cancel()
        with pytest.raises(CancelledError):
            wait_for(waiting)
        spin_until(lambda: hosts(dx, "tx-busy", "waiters") == [], what="the queue left")
    assert_pool_free(dx, "tx-busy")


def test_run_locked_returns_the_result(dx):
    tokens = []

    def work(held: Any) -> Deferred[str]:
        tokens.append(held.token)
        return task.deferLater(reactor, 0.1, lambda: "done")

    assert wait_for(TxLocker(dx.url, reactor, host="worker").run_locked("tx", work)) == "done"
    assert len(tokens) == 1
    assert_pool_free(dx, "tx")


def test_run_locked_cancels_work_when_the_lock_is_lost(dx):
    cancelled = []

    def work(held: Any) -> Deferred[None]:
        steal(dx, "tx-run", "victim")
        return Deferred(cancelled.append)  # would never end by itself

    with pytest.raises(LockLost, match="answered NO"):
        wait_for(TxLocker(dx.url, reactor, host="victim").run_locked("tx-run", work))
    assert len(cancelled) == 1
    assert hosts(dx, "tx-run") == ["thief"]
    release(dx, "tx-run", "thief")
    assert_pool_free(dx, "tx-run")


def test_run_locked_releases_when_the_work_fails(dx):
    def work(held: Any) -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError):
        wait_for(TxLocker(dx.url, reactor, host="worker").run_locked("tx", work))
    assert_pool_free(dx, "tx")


def test_the_plans_count_time_by_the_clock_given(dx, relay):
    clock = task.Clock()
    held = wait_for(TxLocker(relay.url, reactor, host="h", clock=clock.seconds)
                    .acquire("tx-clock"))
    clock.advance(SHORT)  # a whole lease by that clock; next to nothing by the reactor's
    reason = wait_for(held.when_lost())
    assert "no renewal succeeded for a whole lease" in reason
    assert relay.paths() == ["/wait/"]  # by its clock the lease was over: no renewal tried
    wait_for(held.release())
    assert_pool_free(dx, "tx-clock")


def test_a_step_of_the_reactors_wall_clock_does_not_end_a_lease(dx, relay):
    real_seconds = reactor.seconds
    step = [0.0]
    # reactor.seconds is the wall clock: NTP or an administrator may step it.
    reactor.seconds = lambda: real_seconds() + step[0]  # type: ignore[method-assign]
    try:
        held = wait_for(TxLocker(relay.url, reactor, host="h").acquire("tx-step"))
        step[0] = 3600.0
        spin_until(lambda: relay.paths().count("/get/") >= 2 or held.lost, what="renewals")
        assert not held.lost
        wait_for(held.release())
    finally:
        del reactor.seconds
    assert_pool_free(dx, "tx-step")
