"""The etcd backend in process, on a real 3-member etcd: a grant whose
transaction came back late (the server was paused, or etcd slow) is not
answered until it is confirmed; one whose hold ended meanwhile is queued
again, never answered YES beside the next holder (found by
bench/etcd_chaos.py: a server paused right after sending its grant answered
YES four seconds later, when the other servers had ended that hold and
granted the pool again). And a server whose settling of a pool failed tries
again soon: the grant it was told of is not left to the 10 s backstop."""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from clientfixtures import pause, wait_for
from distributex.backend import etcd
from distributex.backend.etcd import EtcdBackend
from distributex.backend.etcd_client import NotSent
from etcdcluster import available

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)")]

LEASE = 2.0


class Paused:
    """Wraps a backend's real etcd client: the answer to its next write
    transaction is held back ``seconds`` after etcd has committed it, as if
    the server had been stopped the moment it sent the write."""

    def __init__(self, backend: EtcdBackend, seconds: float) -> None:
        self.real = backend.client.txn
        self.seconds = seconds
        self.held = 0
        backend.client.txn = self.txn  # type: ignore[method-assign]

    async def txn(self, compare: Any, success: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await self.real(compare, success, *args, **kwargs)
        if not self.held and any("request_put" in op for op in success):
            self.held += 1
            await task.deferLater(reactor, self.seconds, lambda: None)
        return answer


class FailsOnce:
    """Wraps a backend's real etcd client: its next transaction is refused
    as if etcd had said so (a final error, so the operation fails at once)."""

    def __init__(self, backend: EtcdBackend) -> None:
        self.real = backend.client.txn
        self.failed = 0
        backend.client.txn = self.txn  # type: ignore[method-assign]

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed += 1
            raise NotSent("etcd: permission denied (injected)")
        return await self.real(*args, **kwargs)


@pytest.fixture
def servers(etcd_backends):
    return etcd_backends(2, LEASE)


def answered(d: Deferred) -> List[Any]:
    results: List[Any] = []
    d.addBoth(results.append)
    return results


def test_a_grant_that_came_back_after_its_hold_ended_is_queued_again_not_answered(servers):
    a, b = servers
    assert wait_for(a.get("p", "h1", "")).token
    w = answered(b.wait("p", "w", ""))     # B's own waiter, first in the queue
    pause(0.3)
    x = answered(a.wait("p", "x", ""))     # A's waiter, behind it
    pause(0.3)
    paused = Paused(b, 1.5 * LEASE)
    # The release through B grants B's own waiter; B hears of its commit only
    # after A has ended that hold (a lease after the grant) and granted x.
    assert wait_for(b.release("p", "h1")) is True
    assert paused.held, "the release was not the write held back"
    assert len(x) == 1 and x[0].token, "x was not granted once w's hold ended"
    pause(LEASE / 4)
    assert w == [], "w was answered YES for a hold that had ended, while x holds the pool"
    # w was queued again: it is served when x releases.
    assert wait_for(a.release("p", "x")) is True
    pause(0.5)
    assert len(w) == 1 and w[0].token > x[0].token


def test_a_grant_that_came_back_late_but_still_held_is_renewed_then_answered(servers):
    a, b = servers
    assert wait_for(a.get("p", "h1", "")).token
    w = answered(b.wait("p", "w", ""))
    pause(0.3)
    paused = Paused(b, LEASE / 4)  # late (past a tenth of the lease), but the hold stands
    released = b.release("p", "h1")
    pause(LEASE / 8)
    assert w == [], "answered before the grant's transaction came back"
    assert wait_for(released) is True
    pause(0.3)
    assert len(w) == 1 and w[0].token
    # Confirmed means renewed: the other server counts the lease from the
    # confirmation, not from the grant, so it still holds a lease after the grant.
    pause(LEASE * 0.7)
    assert isinstance(wait_for(a.get("p", "someone", "")), str), "the hold ended a lease after its grant"


def test_a_waiter_whose_grant_could_not_be_taken_is_answered_soon_after(servers):
    a, b = servers
    assert wait_for(a.get("p", "h1", "")).token
    w = answered(b.wait("p", "w", ""))
    pause(0.3)
    failing = FailsOnce(b)
    assert wait_for(a.release("p", "h1")) is True
    # B hears of the grant and fails to take it; it tries again within
    # RESETTLE_DELAY, not at the backstop.
    assert etcd.RESETTLE_DELAY * 4 < etcd.BACKSTOP_INTERVAL
    pause(etcd.RESETTLE_DELAY * 4)
    assert failing.failed == 1
    assert len(w) == 1 and w[0].token
