"""The memcache backend's queue (one key per waiter) under interleavings,
against REAL memcached.

Three MemcacheBackend instances share one memcached. Their transactions do
not run in threads: each is a generator of phases (read, apply, write the
record, write the waiter keys), and a Hypothesis state machine decides which
server's phase runs next, so another server may read the record between a
change and the waiter key it promises. Each transaction reads only the head
of the queue (QUEUE_WINDOW is 0 here: maxlocks waiters), so the paths that
read further are taken all the time.

The model replays every committed transaction in the order of its write
(reads commit where they read) and checks, against the places the
transactions gave:

- a waiter is granted only when nobody holds a place before it;
- a /get is never granted while anyone holds a place;
- a /wait is refused only when max_waiters places are held;
- never more than maxlocks holders;
- and, once everything has run, every open waiter is granted in turn as
  the holders release, the queue's count comes back to 0, and what each
  server keeps about its waiters is empty.

The deterministic tests after it take one order each: the paths the
machine reaches rarely (reading past the head, lost waiter keys, a server
stopping while another's key is being written, long left lists).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)
from pymemcache.client.base import Client
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from distributex.backend import memcache
from distributex.backend.base import BackendUnavailable, QueueFull, WaitReset
from distributex.backend.memcache import APPLIED, READ, WRITTEN, MemcacheBackend, make_nodes
from distributex.config import parse_config
from distributex.pool import EXPIRED, GRANTED, LEFT, QUEUED, RELEASED, RENEWED, RESET, Hold

pytestmark = pytest.mark.timeout(600)

POOLS = {"one": (1, 0), "two": (2, 0.2)}  # name -> maxlocks, expire (0: never)
MAX_WAITERS = 5
SERVERS = 3


class Txn:
    def __init__(self, server: "Server", name: str, gen: Any, deferred: Deferred) -> None:
        self.server = server
        self.name = name
        self.gen = gen
        self.deferred = deferred
        self.commit: Optional[int] = None
        self.phase: Optional[str] = None


class Server(MemcacheBackend):
    def __init__(self, machine: "QueueMachine", index: int) -> None:
        self.machine = machine
        self.index = index
        clock = Clock()
        super().__init__(machine.config, clock, nodes=make_nodes(machine.config.memcache_servers),
                         mono=lambda: machine.now + 1000.0 * (index + 1), wall=machine.wall)
        self.clock = clock
        self._beat_now()

    def _submit(self, name: str, op: Any) -> Deferred:
        d: Deferred = Deferred()
        self.machine.inflight.append(Txn(self, name, self._txn(name, op), d))
        return d

    def _stats(self, node: Any) -> Dict[bytes, Any]:
        # A memcached up for long, never flushed: a new namespace is in use
        # at once (the settling of a new marker is tested elsewhere).
        stats = dict(super()._stats(node))
        stats[b"uptime"] = 10 ** 6
        return stats

    def close(self) -> None:
        for node in self.nodes.values():
            node.client.close()


class QueueMachine(RuleBasedStateMachine):
    address = ""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.micros = itertools.count()
        self.wall0 = time.time()
        self.inflight: List[Txn] = []
        self.commits = itertools.count()
        # Completed transactions by commit number: (server, pool, result or failure).
        self.done: Dict[int, Tuple[Server, str, Any]] = {}
        self.replayed = 0
        # The model, built by replaying commits in order.
        self.places: Dict[str, Dict[str, Tuple[str, int]]] = {name: {} for name in POOLS}
        self.holders: Dict[str, Set[Tuple[str, str]]] = {name: set() for name in POOLS}
        self.violations: List[str] = []
        self.waiters: Dict[int, Deferred] = {}
        self.open: Set[int] = set()  # the /wait with no answer yet
        self.waiter_ids = itertools.count()
        self.hosts = itertools.count()

    @initialize(namespace=st.integers(0, 10 ** 9))
    def start(self, namespace: int) -> None:
        pools = "".join(f"  - {{name: {name}, maxlocks: {maxlocks}, expire: {expire}, max_waiters: {MAX_WAITERS}}}\n"
                        for name, (maxlocks, expire) in POOLS.items())
        self.config = parse_config(f"backend: memcache\nnamespace: q{namespace}x{time.monotonic_ns()}\n"
                                   f"memcache_servers: ['{self.address}']\npools:\n{pools}")
        self.servers = [Server(self, i) for i in range(SERVERS)]

    def teardown(self) -> None:
        for server in getattr(self, "servers", []):
            server.close()

    def wall(self) -> float:
        return self.wall0 + self.now + next(self.micros) * 1e-6

    def violated(self, what: str) -> None:
        self.violations.append(what)
        raise AssertionError(what)

    # -- driving transactions ---------------------------------------------------

    def _advance(self, txn: Txn) -> None:
        try:
            phase = next(txn.gen)
        except StopIteration as done:
            self._complete(txn, done.value)
            return
        except BaseException:
            self._complete(txn, Failure())
            return
        txn.phase = phase
        if phase == READ:
            # A transaction that answers without writing commits where it
            # read the record: its place in the order is kept from now.
            self._forgo(txn)
            txn.commit = next(self.commits)
        elif phase == WRITTEN:
            self._forgo(txn)
            txn.commit = next(self.commits)  # the record's write landed

    def _forgo(self, txn: Txn) -> None:
        """The place a transaction kept at its read is not its commit (it
        read again, or wrote): nothing commits there."""
        if txn.commit is not None:
            self.done[txn.commit] = (txn.server, txn.name, None)

    def _complete(self, txn: Txn, outcome: Any) -> None:
        self.inflight.remove(txn)
        if txn.commit is None:
            txn.commit = next(self.commits)  # failed before its first read
        self.done[txn.commit] = (txn.server, txn.name, outcome)
        if isinstance(outcome, Failure):
            txn.deferred.errback(outcome)
        else:
            txn.deferred.callback(outcome)

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 1000))
    def step(self, pick: int) -> None:
        self._advance(self.inflight[pick % len(self.inflight)])

    @precondition(lambda self: any(t.phase == WRITTEN for t in self.inflight))
    @rule(pick=st.integers(0, 1000))
    def read_before_the_keys(self, pick: int) -> None:
        """A server changed the record but has not written its waiter keys
        yet: run another server's transactions meanwhile."""
        promised = [t for t in self.inflight if t.phase == WRITTEN]
        owner = promised[pick % len(promised)].server
        for _ in range(200):
            others = [t for t in self.inflight if t.server is not owner]
            if not others:
                break
            self._advance(others[0])

    @precondition(lambda self: self.inflight)
    @rule()
    def finish_all(self) -> None:
        self._run_all()

    def _run_all(self) -> None:
        for _ in range(1000):
            if not self.inflight:
                return
            self._advance(self.inflight[0])
        raise AssertionError("transactions never finished")

    # -- clients -----------------------------------------------------------------

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)),
          hosts=st.lists(st.sampled_from(["new", "r0", "r1"]), min_size=1, max_size=4))
    def wait(self, index: int, pool: str, hosts: List[str]) -> None:
        """Hosts send /wait through one server, one after the other: new
        ones, or r0 and r1, which may have a place already (queued twice) or
        hold (re-entrant)."""
        server = self.servers[index]
        for host in hosts:
            if host == "new":
                host = f"w{next(self.hosts)}"
            waiter = next(self.waiter_ids)
            d = self.waiters[waiter] = server.wait(pool, host, "")
            self.open.add(waiter)
            d.addCallbacks(self._granted, self._not_granted, callbackArgs=(waiter,), errbackArgs=(waiter,))

    def _granted(self, event: Any, waiter: int) -> None:
        if waiter not in self.open:
            self.violated(f"/wait {waiter} answered twice")
        self.open.discard(waiter)

    def _not_granted(self, failure: Failure, waiter: int) -> None:
        self.open.discard(waiter)
        if not failure.check(QueueFull, CancelledError, BackendUnavailable, WaitReset):
            self.violations.append(failure.getTraceback())

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)), host=st.integers(0, 40))
    def get(self, index: int, pool: str, host: int) -> None:
        self.servers[index].get(pool, f"g{host}", "").addErrback(self._failed)

    @precondition(lambda self: any(self.holders.values()))
    @rule(index=st.integers(0, SERVERS - 1), pick=st.integers(0, 1000))
    def release(self, index: int, pick: int) -> None:
        held = sorted((pool, host) for pool, hosts in self.holders.items() for host, _ in hosts)
        pool, host = held[pick % len(held)]
        self.servers[index].release(pool, host).addErrback(self._failed)

    @precondition(lambda self: self.open)
    @rule(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=3))
    def hang_up(self, picks: List[int]) -> None:
        """Waiters hang up (anywhere in the queue)."""
        for pick in picks:
            if self.open:
                self.waiters[sorted(self.open)[pick % len(self.open)]].cancel()

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)))
    def reset_pool(self, index: int, pool: str) -> None:
        self.servers[index].reset(pool).addErrback(self._failed)

    @rule(index=st.integers(0, SERVERS - 1))
    def poll(self, index: int) -> None:
        self.servers[index]._poll()

    @rule(seconds=st.sampled_from([0.05, 0.25]))
    def tick(self, seconds: float = 0.05) -> None:
        """Time passes: leases end, transactions told to wait try again."""
        self.now += seconds
        for server in self.servers:
            server.clock.advance(seconds)

    def _failed(self, failure: Failure) -> None:
        if not failure.check(BackendUnavailable):
            self.violations.append(failure.getTraceback())

    # -- the model ----------------------------------------------------------------

    def _replay(self) -> None:
        """Apply, in commit order, every completed commit whose predecessors
        have all completed."""
        while self.replayed in self.done:
            server, pool, outcome = self.done.pop(self.replayed)
            self.replayed += 1
            if outcome is None or isinstance(outcome, Failure):
                continue
            places = self.places[pool]
            # The batch's operations in order; the waiters it queued take
            # their places at the back, in the order they queued.
            provisional = itertools.count(10 ** 12)
            for step in outcome.steps:
                for event in step.events:
                    self._apply(pool, places, event)
                    if event.kind == QUEUED:
                        places[event.ticket] = (outcome.epoch, next(provisional))
                if step.refused is not None and len(places) < MAX_WAITERS:
                    self.violated(f"a /wait to {pool} refused with {len(places)} places held")
                if len(places) > MAX_WAITERS:
                    self.violated(f"{len(places)} places in {pool}, more than max_waiters")
            for ticket_id, seq, _, _ in outcome.placed:
                if ticket_id in places:
                    places[ticket_id] = (outcome.epoch, seq)

    def _apply(self, pool: str, places: Dict[str, Tuple[str, int]], event: Any) -> None:
        holders = self.holders[pool]
        if event.kind in (GRANTED, RENEWED) and event.ticket is not None and event.ticket in places:
            mine = places.pop(event.ticket)
            ahead = sorted(t for t, place in places.items() if place < mine)
            if ahead:
                self.violated(f"{event.ticket} at {mine} granted {pool} before {ahead}")
        elif event.kind == GRANTED and places and event.ticket is None:
            self.violated(f"a /get of {pool} granted to {event.host} past {sorted(places)}")
        if event.kind in (LEFT,) or (event.kind == RESET and event.token is None):
            places.pop(event.ticket, None)
        if event.kind == GRANTED:
            holders.add((event.host, event.session))
            if len(holders) > POOLS[pool][0]:
                self.violated(f"{sorted(holders)} all hold {pool}")
        elif event.kind in (RELEASED, EXPIRED) or (event.kind == RESET and event.token is not None):
            holders.discard((event.host, event.session))

    @invariant()
    def consistent(self) -> None:
        assert not self.violations, self.violations
        self._replay()

    @rule()
    def drain(self) -> None:
        """Run everything, release every hold until nobody waits: each open
        waiter is granted, and the queue counts nobody."""
        for _ in range(60):
            self._run_all()
            self._replay()
            if not self.open and not any(self.holders.values()):
                break
            for pool, hosts in self.holders.items():
                for host, _ in sorted(hosts):
                    self.servers[0].release(pool, host).addErrback(self._failed)
            self._run_all()
            for server in self.servers:
                server._poll()
            self.tick()
        self._run_all()
        self._replay()
        assert not self.violations, self.violations
        assert not self.open, f"waiters never granted: {sorted(self.open)}"
        for server in self.servers:
            # Nothing waits: what a server keeps about waiters is empty.
            tables = {"_tickets": server._tickets, "_mine": server._mine, "_placed": server._placed,
                      "_lost_local": server._lost_local, "_missing": server._missing, "_orphans": server._orphans}
            assert not any(tables.values()), {k: v for k, v in tables.items() if v}
        client = Client(tuple(self.address.split(":")))  # type: ignore[arg-type]
        try:
            for pool in POOLS:
                raw = client.get(self.servers[0]._pool_key(pool))
                if raw is not None:
                    record = json.loads(raw)
                    count = record["seq"] - record["lo"] - len(record["x"]) - record["nt"]
                    assert count == 0, f"{pool}: the record counts {count} waiters after the drain: {record}"
        finally:
            client.close()


@pytest.fixture
def narrow_window(monkeypatch):
    # The head read is maxlocks waiters: every path that reads further runs.
    monkeypatch.setattr(memcache, "QUEUE_WINDOW", 0)
    # No place is skipped for a missing key (the model has no lost keys;
    # skipping is tested on its own).
    monkeypatch.setattr(memcache, "MISSING_GRACE", 1e9)


def test_memcache_queue_state_machine(memcached, narrow_window):
    QueueMachine.address = memcached.address
    run_state_machine_as_test(QueueMachine, settings=settings(
        max_examples=200, stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


@pytest.fixture
def driver(memcached, narrow_window):
    """The machine as a plain driver, for one order of steps."""
    QueueMachine.address = memcached.address
    machine = QueueMachine()
    machine.start(namespace=0)
    yield machine
    machine.teardown()


def two_holds_end_with_a_host_queued_twice_ahead(driver: QueueMachine) -> None:
    """Pool "two" (read 2 waiters at a time): g0 and g1 hold; r0, r0 again
    and w0 wait; both leases end."""
    driver.get(0, "two", 0)
    driver.get(0, "two", 1)
    driver.finish_all()
    driver.wait(0, "two", ["r0", "r0", "new"])
    driver.finish_all()
    driver.consistent()
    assert driver.holders["two"] == {("g0", ""), ("g1", "")}
    driver.tick(0.25)


def test_a_semaphore_reads_past_renewals_to_fill_a_free_slot(driver):
    two_holds_end_with_a_host_queued_twice_ahead(driver)
    # One transaction ends the leases: r0 is granted, its second place
    # renews it, and w0, which it had not read, gets the slot left.
    driver.servers[0]._apply("two", memcache._tick).addErrback(driver._failed)
    driver.finish_all()
    driver.consistent()
    driver.consistent()
    assert driver.holders["two"] == {("r0", ""), ("w0", "")}


def test_a_get_does_not_take_a_slot_owed_to_a_waiter_behind_the_head_read(driver):
    two_holds_end_with_a_host_queued_twice_ahead(driver)
    driver.get(0, "two", 9)
    driver.finish_all()
    driver.consistent()
    assert driver.holders["two"] == {("r0", ""), ("w0", "")}


def test_a_waiter_that_hangs_up_while_its_grant_is_being_taken_gives_the_slot_back(driver):
    # Pool "two": g0 and g1 hold; w waits through server 1, c through 2.
    driver.get(0, "two", 0)
    driver.get(0, "two", 1)
    driver.finish_all()
    w = driver.servers[1].wait("two", "w", "")
    w.addErrback(lambda f: f.trap(CancelledError))
    driver.finish_all()
    driver.wait(2, "two", ["new"])
    driver.finish_all()
    driver.servers[0].release("two", "g0").addErrback(driver._failed)  # grants w: server 1 tells it
    driver.finish_all()
    driver.servers[1]._poll()
    (take,) = driver.inflight
    while take.phase != APPLIED:  # its transaction has taken w's grant (renewing it) ...
        driver._advance(take)
    w.cancel()  # ... when w hangs up
    driver.finish_all()
    driver.consistent()
    assert driver.holders["two"] == {("g1", ""), ("w0", "")}, "w's slot was never given back"


@pytest.fixture
def lossy_driver(memcached, monkeypatch):
    """A driver whose head read is maxlocks waiters, and where a place whose
    key never comes is skipped after MISSING_GRACE."""
    monkeypatch.setattr(memcache, "QUEUE_WINDOW", 0)
    QueueMachine.address = memcached.address
    driver = QueueMachine()
    driver.start(namespace=0)
    yield driver
    driver.teardown()


def read_record(driver: QueueMachine, pool: str) -> Dict[str, Any]:
    client = Client(tuple(driver.address.split(":")))  # type: ignore[arg-type]
    try:
        return json.loads(client.get(driver.servers[0]._pool_key(pool)))
    finally:
        client.close()


def test_a_place_whose_key_never_comes_is_skipped_and_its_waiter_queues_again(lossy_driver):
    driver = lossy_driver
    driver.get(0, "one", 0)
    driver.finish_all()
    driver.consistent()
    driver.wait(1, "one", ["new"])
    (promised,) = driver.inflight
    while promised.phase != WRITTEN:
        driver._advance(promised)  # server 1 took a place; its key is not written yet
    released: List[bool] = []
    # g0 releases through server 0, which finds the place without its key.
    driver.servers[0].release("one", "g0").addCallback(released.append)
    driver.read_before_the_keys(0)
    assert not released, "the release waits for the key"
    driver.tick(memcache.MISSING_GRACE + 0.1)
    driver.read_before_the_keys(0)
    assert released == [True], "the place is skipped once its key is overdue"
    driver.finish_all()  # server 1 writes its key, too late
    driver.poll(1)  # and finds its waiter passed over with no answer: it queues again
    driver.finish_all()
    driver.poll(1)
    driver.finish_all()
    driver.consistent()
    assert driver.holders["one"] == {("w0", "")}
    assert not driver.open


def test_a_pool_serves_again_after_more_lost_places_than_its_head_read(lossy_driver):
    driver = lossy_driver
    driver.get(0, "one", 0)
    driver.finish_all()
    driver.get(1, "one", 5)  # in flight: the two /wait after it go together
    driver.wait(1, "one", ["new", "new"])
    (first,) = driver.inflight
    while first in driver.inflight:
        driver._advance(first)
    (promised,) = driver.inflight
    while promised.phase != WRITTEN:
        driver._advance(promised)
    driver.inflight.remove(promised)  # server 1 dies between its record write and its two keys
    released: List[bool] = []
    driver.servers[0].release("one", "g0").addCallback(released.append)
    driver.finish_all()
    # The first place is overdue after a grace; the read then goes further
    # and finds the second one missing too: overdue after another grace.
    for _ in range(2):
        driver.tick(memcache.MISSING_GRACE + 0.1)
        driver.finish_all()
    assert released == [True], "both places are skipped, though the head read covers one"
    got: List[Any] = []
    driver.servers[2].get("one", "g9", "").addCallback(got.append)
    driver.finish_all()
    assert isinstance(got[0], Hold)


def test_waiters_leaving_behind_the_head_keep_the_record_small(driver):
    driver.get(0, "one", 0)
    driver.wait(0, "one", ["new"])  # a patient waiter at the head
    driver.finish_all()
    for _ in range(memcache.LEFT_LISTED + 100):
        driver.wait(1, "one", ["new"])
        driver.finish_all()
        driver.hang_up([len(driver.open) - 1])
        driver.finish_all()
    record = read_record(driver, "one")
    assert len(record["x"]) <= memcache.LEFT_LISTED + 1
    assert record["seq"] - record["lo"] - len(record["x"]) - record["nt"] == 1


@pytest.fixture
def short_list(driver, monkeypatch):
    """g0 holds "one"; W0 waits at its head; four waiters behind it leave
    and W5 queues after them: with LEFT_LISTED 3 their places are counted,
    not listed (nt 4)."""
    monkeypatch.setattr(memcache, "LEFT_LISTED", 3)
    driver.get(0, "one", 0)
    driver.finish_all()
    driver.wait(0, "one", ["new"])
    driver.finish_all()
    for _ in range(4):
        driver.wait(1, "one", ["new"])
        driver.finish_all()
        driver.hang_up([len(driver.open) - 1])
        driver.finish_all()
    driver.wait(2, "one", ["new"])
    driver.finish_all()
    record = read_record(driver, "one")
    assert (record["x"], record["nt"], record["seq"] - record["lo"] - record["nt"]) == ([], 4, 2)
    return driver


def test_status_lists_the_waiters_behind_counted_left_places(short_list):
    status: List[Any] = []
    short_list.servers[1]._snapshot("one").addCallback(status.append)
    short_list.finish_all()
    (_, state, _), = status
    assert [t.host for t in state.queue.values()] == ["w0", "w5"]


def test_a_reset_drops_the_waiters_behind_counted_left_places(short_list):
    short_list.reset_pool(1, "one")
    short_list.finish_all()
    short_list.drain()
    assert not short_list.open
    record = read_record(short_list, "one")
    assert record["lo"] == record["seq"] and record["nt"] == 0


def test_polling_a_pool_with_counted_left_places_writes_nothing(short_list):
    client = Client(tuple(short_list.address.split(":")))  # type: ignore[arg-type]
    key = short_list.servers[0]._pool_key("one")
    try:
        before = client.gets(key)[1]
        for server in range(SERVERS):
            for _ in range(3):
                short_list.servers[server]._apply("one", memcache._tick)
                short_list.finish_all()
        assert client.gets(key)[1] == before
    finally:
        client.close()


def test_a_read_of_every_place_counts_the_left_places_again(short_list, monkeypatch):
    monkeypatch.setattr(memcache, "MISSING_GRACE", 1.0)
    # A tombstone vanishes (memcached evicted it: it runs without -M).
    client = Client(tuple(short_list.address.split(":")))  # type: ignore[arg-type]
    record = read_record(short_list, "one")
    key = short_list.servers[0]._q_key(record["e"], 2)
    try:
        # Tombstones are written without waiting for memcached's answer:
        # delete this one once it is there.
        for _ in range(100):
            if client.get(key) == memcache.TOMBSTONE:
                break
            time.sleep(0.01)
        client.delete(key)
    finally:
        client.close()
    status: List[Any] = []
    short_list.servers[1]._snapshot("one").addCallback(status.append)  # reads every place
    short_list.finish_all()
    short_list.tick(1.1)  # the place without a key is skipped after the grace
    short_list.finish_all()
    assert status
    record = read_record(short_list, "one")
    assert (record["x"], record["nt"]) == ([2], 3)
    short_list.drain()  # W0 and W5 granted in turn; the missing place is skipped on the way


def test_waiters_dropped_by_a_reset_through_their_own_server_leave_nothing_behind(driver):
    for server in (0, 1):
        driver.get(0, "one", 0)
        driver.wait(0, "one", ["new", "new"])
        driver.finish_all()
        driver.reset_pool(server, "one")
        driver.finish_all()
        driver.drain()  # every table of every server is empty again


def test_a_stopping_server_leaves_its_places_even_while_a_key_is_being_written(driver):
    stopping = driver.servers[0]
    for host in (0, 1):
        driver.get(2, "two", host)
        driver.finish_all()
    driver.wait(0, "two", ["new"])  # the stopping server's waiter: place 0
    driver.finish_all()
    driver.wait(1, "two", ["new"])
    (promised,) = driver.inflight
    while promised.phase != WRITTEN:
        driver._advance(promised)  # place 1 is counted (and in the head read), its key not written yet
    driver.inflight.remove(promised)
    stopping.stopService()
    while [t for t in driver.inflight if t.server is stopping]:
        driver._advance([t for t in driver.inflight if t.server is stopping][0])  # its leave must wait
    driver.inflight.append(promised)
    driver.finish_all()
    driver.tick()  # the leave tries again
    driver.finish_all()
    assert not stopping._orphans
    record = read_record(driver, "two")
    assert (record["lo"], record["seq"]) == (1, 2), "place 0 left, place 1 waits"


def test_a_thousand_waiters_with_1_kib_hosts_and_labels_queue_on_one_pool(memcached, monkeypatch):
    """The queue is not one record: memcached's 1 MB item holds about 500
    such waiters, the queue holds max_waiters of them."""
    monkeypatch.setattr(sys.modules[__name__], "MAX_WAITERS", 2000)
    QueueMachine.address = memcached.address
    driver = QueueMachine()
    driver.start(namespace=0)
    try:
        driver.get(0, "one", 0)
        refused: List[Failure] = []
        for i in range(1000):
            driver.servers[i % SERVERS].wait("one", f"{i:04d}" + "h" * 1020, "l" * 1024).addErrback(refused.append)
            driver.finish_all()
        assert not refused, refused[0]
        status: List[Any] = []
        driver.servers[1]._snapshot("one").addCallback(status.append)
        driver.finish_all()
        (_, state, _), = status
        assert [t.host[:4] for t in state.queue.values()] == [f"{i:04d}" for i in range(1000)]
    finally:
        driver.teardown()
