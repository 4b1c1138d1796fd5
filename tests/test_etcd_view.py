"""The etcd backend in process, on a real 3-member etcd: the view a server
keeps of a pool between its operations follows the watch, so that a
handoff across servers costs the waiter's server one transaction (the one
that takes its grant), however long the queue behind it."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import pytest

from clientfixtures import pause, wait_for
from distributex.backend import etcd
from distributex.backend.etcd import EtcdBackend
from etcdcluster import available

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)")]

#: Longer than the head a server reads of a mutex's queue (maxlocks + HEAD_EXTRA).
WAITERS = 1 + etcd.HEAD_EXTRA + 6


class Counted:
    """Wraps a backend's real etcd client and counts its transactions."""

    def __init__(self, backend: EtcdBackend) -> None:
        self.real = backend.client.txn
        self.count = 0
        backend.client.txn = self.txn  # type: ignore[method-assign]

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return await self.real(*args, **kwargs)


@pytest.fixture
def servers(etcd_backends):
    return etcd_backends(2)


def test_a_handoff_costs_the_waiters_server_one_transaction_with_a_queue_longer_than_the_head_it_reads(servers):
    a, b = servers
    assert wait_for(a.get("p", "h", "")).token
    granted: Dict[int, Any] = {}
    for i in range(WAITERS):
        b.wait("p", f"w{i}", "").addCallback(lambda event, i=i: granted.setdefault(i, event))
    deadline = time.monotonic() + 10
    while len(wait_for(b._snapshot("p"))[1].queue) < WAITERS:
        assert time.monotonic() < deadline, "the waiters were not all queued"
        pause(0.05)
    pause(0.3)  # the watch has brought both servers up to date
    counted = Counted(b)
    per_handoff: List[int] = []
    holder = "h"
    for i in range(WAITERS):
        before = counted.count
        assert wait_for(a.release("p", holder)) is True
        deadline = time.monotonic() + 10
        while i not in granted:
            assert time.monotonic() < deadline, f"w{i} was not granted"
            pause(0.002)
        per_handoff.append(counted.count - before)
        holder = f"w{i}"
    assert per_handoff == [1] * WAITERS
