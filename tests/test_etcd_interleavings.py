"""The etcd backend under interleavings, against a REAL 3-member etcd.

Three servers (EtcdBackend instances in this process) share one namespace.
Every transaction a server sends to etcd waits at a gate, and a Hypothesis
state machine decides which waiting transaction is sent next, and when the
answer of one that etcd has already applied reaches its server. So a server
plans from a view that another server's committed change has made stale, or
hears of a change through its watch before the transaction that made it has
returned, or renews a hold that another server is giving to its waiter.

What the clients were told is checked against the contract:

- never more holders than maxlocks: a YES to a new holder while maxlocks
  others hold (were told YES and have not sent their release) is a
  violation;
- fencing tokens: in a mutex every new grant's token is above every earlier
  one; in a semaphore no two grants share one; a holder asking again gets
  its own token back;
- a holder's /get/ is always YES (re-entrant), its /release/ always found
  its hold;
- and once everything has run, every open /wait is granted in turn as the
  holders release, and each pool is free on every server.

Leases are off (expire 0): what is timed is tested elsewhere; here the
order of events is what varies.
"""

from __future__ import annotations

from collections import Counter
import itertools
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from clientfixtures import pause, wait_for
from distributex.backend.base import BackendUnavailable, QueueFull
from distributex.backend.etcd import EtcdBackend
from distributex.config import parse_config
from etcdcluster import available

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)")]

POOLS = {"one": 1, "two": 2}  # name -> maxlocks
SERVERS = 3
TXN = "/v3/kv/txn"


class Held:
    """One transaction at the gate: sent when ``send`` fires; once etcd has
    answered, its answer reaches the server when ``deliver`` fires."""

    def __init__(self, server: int) -> None:
        self.server = server
        self.send: Deferred[None] = Deferred()
        self.answered: Deferred[None] = Deferred()
        self.deliver: Deferred[None] = Deferred()


class EtcdMachine(RuleBasedStateMachine):
    endpoints: List[str] = []

    def __init__(self) -> None:
        super().__init__()
        pools = "".join(f"  - {{name: {name}, maxlocks: {n}, expire: 0}}\n" for name, n in POOLS.items())
        config = parse_config(f"backend: etcd\netcd_endpoints: {list(self.endpoints)}\n"
                              f"namespace: il{time.monotonic_ns()}\npools:\n{pools}")
        self.unsent: List[Held] = []
        self.applied: List[Held] = []
        self.auto = False  # the gate is open (while draining)
        self.servers = [EtcdBackend(config, reactor) for _ in range(SERVERS)]
        for index, server in enumerate(self.servers):
            self._gate(index, server)
            server.startService()
        self.names = itertools.count()
        # The clients' side: who was told YES (and has not released), with its token.
        self.holding: Dict[str, Dict[str, int]] = {name: {} for name in POOLS}
        # How many releases each (pool, host) has sent: a renewal sent before
        # one of them may be answered as a new request.
        self.releases: Counter[Tuple[str, str]] = Counter()
        self.waiting: Dict[str, Tuple[str, Deferred]] = {}  # host -> (pool, its /wait)
        self.tokens: Dict[str, Set[int]] = {name: set() for name in POOLS}
        # Holds of unknown fate (a release or /get/ that failed): released in the drain.
        self.releasing: Set[Tuple[str, str]] = set()
        self.in_flight: Set[Deferred] = set()  # the /get/ and /release/ with no answer yet
        self.violations: List[str] = []
        globalLogPublisher.addObserver(self._log)

    def _log(self, event: Dict[str, Any]) -> None:
        # Nothing here deletes a key or restarts etcd: a server that thinks
        # so (and blocks the pool for a lease) misread the store.
        if event.get("log_level") in (LogLevel.critical, LogLevel.error):
            self.violated(f"logged: {formatEvent(event)}")

    def _gate(self, index: int, server: EtcdBackend) -> None:
        real = server.client.request

        async def request(path: str, payload: Dict[str, Any], endpoint: Optional[str] = None) -> Dict[str, Any]:
            if path != TXN or self.auto:
                return await real(path, payload, endpoint)
            held = Held(index)
            self.unsent.append(held)
            await held.send
            try:
                answer: Any = await real(path, payload, endpoint)
            except Exception:
                answer = Failure()
            self.applied.append(held)
            held.answered.callback(None)
            if not self.auto:
                await held.deliver
            if isinstance(answer, Failure):
                answer.raiseException()
            return answer  # type: ignore[no-any-return]

        server.client.request = request  # type: ignore[method-assign]

    def violated(self, what: str) -> None:
        self.violations.append(what)

    def teardown(self) -> None:
        try:
            self._drain()
        finally:
            globalLogPublisher.removeObserver(self._log)
            self._open_gate()
            for server in self.servers:
                wait_for(server.stopService())

    # -- the gate ------------------------------------------------------------------------

    @precondition(lambda self: self.unsent)
    @rule(pick=st.integers(0, 1000))
    def send(self, pick: int) -> None:
        """etcd applies one waiting transaction (its server does not know yet)."""
        held = self.unsent.pop(pick % len(self.unsent))
        held.send.callback(None)
        wait_for(held.answered, timeout=15)

    @precondition(lambda self: self.applied)
    @rule(pick=st.integers(0, 1000))
    def deliver(self, pick: int) -> None:
        """One applied transaction's answer reaches its server."""
        held = self.applied.pop(pick % len(self.applied))
        held.deliver.callback(None)
        pause(0.005)

    @rule()
    def settle(self) -> None:
        """Time passes: watch events arrive, servers react to them."""
        pause(0.02)

    def _open_gate(self) -> None:
        self.auto = True
        while self.unsent or self.applied:
            for held in self.unsent[:]:
                self.unsent.remove(held)
                held.send.callback(None)
            for held in self.applied[:]:
                self.applied.remove(held)
                if not held.deliver.called:
                    held.deliver.callback(None)
            pause(0.01)

    # -- clients -------------------------------------------------------------------------

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)))
    def wait(self, index: int, pool: str) -> None:
        host = f"w{next(self.names)}"
        d = self.servers[index].wait(pool, host, "")
        self.waiting[host] = (pool, d)
        d.addCallbacks(self._granted, self._not_granted, callbackArgs=(pool, host), errbackArgs=(host,))
        pause(0.005)

    def _granted(self, event: Any, pool: str, host: str) -> None:
        self.waiting.pop(host, None)
        self._told_yes(pool, host, event.token)

    def _not_granted(self, failure: Failure, host: str) -> None:
        self.waiting.pop(host, None)
        if not failure.check(CancelledError, QueueFull, BackendUnavailable):
            self.violated(failure.getTraceback())

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)))
    def get(self, index: int, pool: str) -> None:
        host = f"g{next(self.names)}"
        self._track(self.servers[index].get(pool, host, "")).addCallbacks(
            self._got, self._failed, callbackArgs=(pool, host), errbackArgs=(pool, host))
        pause(0.005)

    def _got(self, answer: Any, pool: str, host: str) -> None:
        if not isinstance(answer, str):
            self._told_yes(pool, host, answer.token)

    def _failed(self, failure: Failure, pool: str, host: str) -> None:
        # Its fate is unknown (it may hold): it releases in the drain.
        if not failure.check(BackendUnavailable):
            self.violated(failure.getTraceback())
        self.releasing.add((pool, host))

    def _told_yes(self, pool: str, host: str, token: int) -> None:
        holders = self.holding[pool]
        if len(holders) >= POOLS[pool]:
            self.violated(f"{host} told YES for {pool} while {sorted(holders)} hold it")
        if token in self.tokens[pool]:
            self.violated(f"{host} granted {pool} with token {token}, given before")
        if POOLS[pool] == 1 and self.tokens[pool] and token < max(self.tokens[pool]):
            self.violated(f"{host} granted {pool} with token {token}, below {max(self.tokens[pool])}")
        self.tokens[pool].add(token)
        holders[host] = token

    @precondition(lambda self: any(self.holding.values()))
    @rule(index=st.integers(0, SERVERS - 1), pick=st.integers(0, 1000))
    def renew(self, index: int, pick: int) -> None:
        """A holder asks again through any server: YES, its own token."""
        pool, host = self._pick_holder(pick)
        token = self.holding[pool][host]
        releases = self.releases[(pool, host)]

        def renewed(answer: Any) -> None:
            if self.releases[(pool, host)] != releases:
                # It released meanwhile. If the release landed first, this
                # was a new request: granted anew (a new token), or the
                # renewal of the grant another such request got.
                if not isinstance(answer, str) and answer.token not in (token, self.holding[pool].get(host)):
                    self._got(answer, pool, host)
            elif isinstance(answer, str):
                self.violated(f"holder {host} of {pool} refused a renewal: {answer}")
            elif answer.token != token:
                self.violated(f"holder {host} of {pool} renewed with token {answer.token}, not {token}")

        def failed(failure: Failure) -> None:
            self._tolerated(failure)
            if self.releases[(pool, host)] != releases:
                self.releasing.add((pool, host))

        self._track(self.servers[index].get(pool, host, "")).addCallbacks(renewed, failed)
        pause(0.005)

    @precondition(lambda self: any(self.holding.values()))
    @rule(index=st.integers(0, SERVERS - 1), pick=st.integers(0, 1000))
    def release(self, index: int, pick: int) -> None:
        pool, host = self._pick_holder(pick)
        self._let_go(pool, host)

        def released(held: bool) -> None:
            if not held:
                self.violated(f"the release of {host}'s hold of {pool} found no hold")

        def failed(failure: Failure) -> None:
            self._tolerated(failure)
            self.releasing.add((pool, host))

        self._track(self.servers[index].release(pool, host)).addCallbacks(released, failed)
        pause(0.005)

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 1000))
    def hang_up(self, pick: int) -> None:
        host = sorted(self.waiting)[pick % len(self.waiting)]
        self.waiting[host][1].cancel()
        pause(0.005)

    def _track(self, d: Deferred) -> Deferred:
        self.in_flight.add(d)

        def done(result: Any) -> Any:
            self.in_flight.discard(d)
            return result

        return d.addBoth(done)

    def _let_go(self, pool: str, host: str) -> None:
        del self.holding[pool][host]  # from now it may not count on the pool
        self.releases[(pool, host)] += 1

    def _pick_holder(self, pick: int) -> Tuple[str, str]:
        held = sorted((pool, host) for pool, hosts in self.holding.items() for host in hosts)
        return held[pick % len(held)]

    def _tolerated(self, failure: Failure) -> None:
        if not failure.check(BackendUnavailable):
            self.violated(failure.getTraceback())

    @invariant()
    def consistent(self) -> None:
        assert not self.violations, self.violations

    # -- the end -------------------------------------------------------------------------

    def _drain(self) -> None:
        """Open the gate; release every hold until nobody waits: each open
        /wait is granted, and then every pool is free on every server."""
        self._open_gate()
        deadline = time.monotonic() + 30
        while self.waiting or any(self.holding.values()) or self.releasing or self.in_flight:
            assert time.monotonic() < deadline, f"waiters never granted: {sorted(self.waiting)}"
            for pool, hosts in self.holding.items():
                for host in list(hosts):
                    self._let_go(pool, host)
                    self.servers[0].release(pool, host).addErrback(self._tolerated)
            for pool, host in list(self.releasing):
                self.releasing.discard((pool, host))
                wait_for(self.servers[0].release(pool, host))
            pause(0.1)
        assert not self.violations, self.violations
        # The servers may still be giving back the grants of waiters that
        # hung up: each pool is free on every server soon after.
        for server in self.servers:
            for pool in POOLS:
                host = f"last{next(self.names)}"
                deadline = time.monotonic() + 10
                while isinstance(answer := wait_for(server.get(pool, host, "")), str):
                    assert time.monotonic() < deadline, \
                        f"{pool} is not free after the drain: {answer}; held by {server._holds.get(pool)}"
                    pause(0.05)
                assert wait_for(server.release(pool, host)) is True
            assert not server._tickets, server._tickets


def test_etcd_backend_state_machine(etcd_cluster):
    EtcdMachine.endpoints = list(etcd_cluster.endpoints)
    run_state_machine_as_test(EtcdMachine, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def _held_from(machine: EtcdMachine, server: int, timeout: float = 5.0) -> Held:
    """The first transaction of ``server`` waiting at the gate."""
    deadline = time.monotonic() + timeout
    while True:
        for held in machine.unsent:
            if held.server == server:
                machine.unsent.remove(held)
                return held
        assert time.monotonic() < deadline, f"server {server} sent no transaction"
        pause(0.01)


def test_a_waiter_that_hangs_up_while_its_grant_is_being_taken_gives_the_pool_back(etcd_cluster):
    EtcdMachine.endpoints = list(etcd_cluster.endpoints)
    machine = EtcdMachine()
    a, b = machine.servers[0], machine.servers[1]
    try:
        machine.auto = True
        assert not isinstance(wait_for(a.get("one", "h", "")), str)
        w = b.wait("one", "w", "")
        w.addErrback(lambda f: f.trap(CancelledError))
        pause(0.3)
        c: List[Any] = []
        a.wait("one", "c", "").addBoth(c.append)
        pause(0.3)
        machine.auto = False
        a.release("one", "h")
        release = _held_from(machine, 0)
        release.send.callback(None)  # grants w; B hears of it through its watch
        wait_for(release.answered)
        release.deliver.callback(None)
        take = _held_from(machine, 1)  # B takes the grant to tell w ...
        take.send.callback(None)
        wait_for(take.answered)
        w.cancel()  # ... and w hangs up before B hears back
        take.deliver.callback(None)
        machine._open_gate()
        deadline = time.monotonic() + 5
        while not c and time.monotonic() < deadline:
            pause(0.05)
        assert c and not isinstance(c[0], Failure), "the pool was never given back: c still waits"
        assert not machine.violations, machine.violations
    finally:
        machine._open_gate()
        globalLogPublisher.removeObserver(machine._log)
        for server in machine.servers:
            wait_for(server.stopService())


def test_a_read_answered_after_the_watch_showed_holders_is_not_taken_for_a_lost_pool(etcd_cluster):
    EtcdMachine.endpoints = list(etcd_cluster.endpoints)
    machine = EtcdMachine()
    try:
        machine.get(0, "one")  # server 0 reads the pool: it does not exist yet
        machine.send(0)
        machine.get(1, "one")  # server 1 asks too: its read waits at the gate
        machine.deliver(0)  # server 0 creates the pool and grants (its write waits)
        machine.send(0)  # server 1's read is answered: no pool key ...
        machine.send(0)  # ... then server 0's write lands, and server 1's watch shows it
        machine.settle()
        machine.deliver(0)  # server 1 hears its read's answer only now
        machine.settle()
        assert not machine.violations, machine.violations
    finally:
        machine.teardown()
