"""The etcd backend in process, on a real 3-member etcd: the view a server
keeps of a pool between its operations follows the watch, so that a
handoff across servers costs the waiter's server one transaction (the one
that takes its grant), however long the queue behind it."""

from __future__ import annotations

import itertools
import time
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred

from clientfixtures import pause, wait_for
from distributex.backend import etcd
from distributex.backend.etcd import EtcdBackend
from distributex.config import parse_config
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


#: Long enough for both servers to finish what a step started and to see it through the watch.
SETTLE = 0.1
POOLS = {"one": 1, "two": 2}  # name -> maxlocks


def _kvs(kvs: List[Any]) -> List[tuple]:
    return sorted((kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) for kv in kvs)


class ViewMachine(RuleBasedStateMachine):
    """Two servers take, wait for, release and leave two pools, one step at
    a time; once both have settled, every view a server keeps of a pool is
    what a read of the same window returns: whether the server built it
    from its own write or brought it up to date from the watch."""

    endpoints: List[str] = []

    def __init__(self) -> None:
        super().__init__()
        pools = "".join(f"  - {{name: {name}, maxlocks: {n}, expire: 0}}\n" for name, n in POOLS.items())
        config = parse_config(f"backend: etcd\netcd_endpoints: {list(self.endpoints)}\n"
                              f"namespace: vm{time.monotonic_ns()}\npools:\n{pools}")
        self.servers = [EtcdBackend(config, reactor) for _ in range(2)]
        for server in self.servers:
            server.startService()
        self.hosts = itertools.count()
        self.holding: List[Tuple[int, str, str]] = []  # (server, pool, host)
        self.waiting: List[Tuple[int, str, str, Deferred]] = []
        self.checked = 0

    def teardown(self) -> None:
        for _, _, _, d in self.waiting:
            d.cancel()
        for server in self.servers:
            wait_for(server.stopService())

    def _granted(self, event: Any, index: int, pool: str, host: str) -> None:
        self.waiting = [w for w in self.waiting if w[2] != host]
        self.holding.append((index, pool, host))

    @rule(index=st.integers(0, 1), pool=st.sampled_from(sorted(POOLS)))
    def get(self, index: int, pool: str) -> None:
        host = f"g{next(self.hosts)}"
        if not isinstance(wait_for(self.servers[index].get(pool, host, "")), str):
            self.holding.append((index, pool, host))

    @rule(index=st.integers(0, 1), pool=st.sampled_from(sorted(POOLS)))
    def wait(self, index: int, pool: str) -> None:
        host = f"w{next(self.hosts)}"
        d = self.servers[index].wait(pool, host, "")
        d.addCallbacks(self._granted, lambda f: f.trap(CancelledError), callbackArgs=(index, pool, host))
        self.waiting.append((index, pool, host, d))

    @precondition(lambda self: self.holding)
    @rule(pick=st.integers(0, 1000), through=st.integers(0, 1))
    def release(self, pick: int, through: int) -> None:
        _, pool, host = self.holding.pop(pick % len(self.holding))
        assert wait_for(self.servers[through].release(pool, host)) is True

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 1000))
    def hang_up(self, pick: int) -> None:
        self.waiting.pop(pick % len(self.waiting))[3].cancel()

    @invariant()
    def views_are_what_a_read_returns(self) -> None:
        pause(SETTLE)
        for server in self.servers:
            for name, (view, wlo, whi, limit) in list(server._views.items()):
                # The watch may shrink a view's head (_follow): it is then
                # what a read with its own, smaller limit returns.
                assert (view.wlo, view.whi) == (wlo, (1 << 62) if whi is None else whi)
                assert 0 < view.limit <= limit or view.limit == limit == 0
                read = wait_for(ensureDeferred(server._read(name, wlo, whi, view.limit, [], server.mono() + 5)))
                assert read.revision >= view.revision
                assert (_kvs([view.pool]), view.meta, _kvs(view.head), _kvs(view.answers), view.window_count) == \
                    (_kvs([read.pool]), read.meta, _kvs(read.head), _kvs(read.answers), read.window_count), name
                self.checked += 1



def test_every_view_a_server_keeps_is_what_a_read_of_its_window_returns(etcd_cluster, monkeypatch):
    built = []
    real = EtcdBackend._view_after
    monkeypatch.setattr(EtcdBackend, "_view_after", lambda self, *a: built.append(1) or real(self, *a))
    ViewMachine.endpoints = list(etcd_cluster.endpoints)
    run_state_machine_as_test(ViewMachine, settings=settings(
        max_examples=10, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
    assert built, "no view was built from a write"
