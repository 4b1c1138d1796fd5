"""A Hypothesis state machine over the memcache backend against REAL memcached.

Two or three MemcacheBackend instances (each its own server id, monotonic
clock and skewed wall clock) share two real memcached processes. Their
transactions do not run in threads: each is a generator of phases (read,
apply, write), and the machine decides which server's phase runs next, so
reads and writes of different servers interleave in every order, with
memcached restarts, flushes, server restarts and time in between.

The model is the clients' view: a client believes it holds a pool from the
moment its grant (or renewal) was applied (for a /wait granted through
another server: from the transaction that delivered it, which renews it)
until one lease later, or until it sends /release. Invariants:

- never more than maxlocks believers of a pool at once;
- every new grant of a pool takes a token above every earlier one, also
  across lost records;
- a /wait is answered at most once, and only by its own transition (a grant
  or renewal applied to its ticket, with that token).

What the model assumes (the backend's documented bounds): every live server
runs its heartbeat at least once a second; clocks are within MAX_CLOCK_SKEW
of memcached's; and after memcached loses its data some live server that
saw it before is still running (else no server can know what was lost).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pymemcache.client.rendezvous import RendezvousHash

from distributex.backend.base import BackendUnavailable
from distributex.backend.memcache import APPLIED, MemcacheBackend, make_nodes
from distributex.config import parse_config
from distributex.pool import GRANTED, RENEWED, Hold
from servers import Memcached

pytestmark = pytest.mark.timeout(600)

POOLS = {"p": (1, 2.0), "s": (2, 3.0)}  # name -> (maxlocks, expire)
HOSTS = ["h1", "h2", "h3"]
SERVERS = 3


class Txn:
    """One transaction in flight: its phases and the Deferred it answers."""

    def __init__(self, server: "Server", gen: Any, deferred: Deferred) -> None:
        self.server = server
        self.gen = gen
        self.deferred = deferred
        self.applied_at: Optional[float] = None


class Server(MemcacheBackend):
    """A backend whose transactions the machine runs phase by phase, on
    the machine's clock."""

    def __init__(self, machine: "MemcacheMachine", index: int, skew: float) -> None:
        self.machine = machine
        self.index = index
        self.skew = skew
        base = 1000.0 * (index + 1) + 17.0 * machine.generation
        clock = Clock()
        super().__init__(machine.config, clock, nodes=make_nodes(machine.config.memcache_servers),
                         mono=lambda: machine.now + base,
                         wall=lambda: machine.wall() + self.skew)
        self.clock = clock
        self.observers.append(machine.observe)

    def _submit(self, name: str, operation: Any) -> Deferred:
        d: Deferred = Deferred()
        self.machine.inflight.append(Txn(self, self._txn(name, operation), d))
        return d

    def _stats(self, node: Any) -> Dict[bytes, Any]:
        stats = dict(super()._stats(node))
        # memcached's clock and uptime, on the machine's clock.
        stats[b"time"] = int(self.machine.wall())
        stats[b"uptime"] = int(self.machine.now - self.machine.node_started[node.address])
        stats[b"cmd_flush"] = self.machine.flushes[node.address]
        return stats

    def close(self) -> None:
        for node in self.nodes.values():
            node.client.close()


class MemcacheMachine(RuleBasedStateMachine):
    memcacheds: List[Memcached] = []

    def __init__(self) -> None:
        super().__init__()
        self.generation = next(_generations)
        self.now = 0.0
        self.wall0 = time.time()
        self.step_no = 0
        addresses = [m.address for m in self.memcacheds]
        self.addresses = addresses
        self.node_started = {a: -1000.0 for a in addresses}  # up long before: a new namespace
        self.flushes = {a: 0 for a in addresses}
        self.last_loss: Dict[str, int] = {}  # node -> step of its last loss
        self.reacted: Set[str] = set(addresses)  # nodes whose last loss an older server has seen
        self.inflight: List[Txn] = []
        self.micros = itertools.count()
        # What went wrong inside a Deferred's callbacks, where an exception
        # would only become a failed request: checked by the invariant.
        self.violations: List[str] = []
        self.servers: List[Server] = []
        self.created: Dict[int, int] = {}  # server index -> step it started
        self.stamp: Optional[float] = None  # the apply time of the transaction committing now
        self.beliefs: Dict[Tuple[str, str], float] = {}  # (pool, host) -> believed until
        self.max_token: Dict[str, int] = {}
        self.applied: Dict[Tuple[str, str], Tuple[str, int, float]] = {}  # (pool, ticket) -> kind, token, at
        self.waiters: Dict[int, Tuple[Server, Deferred, str, str]] = {}
        self.answered: Set[int] = set()
        self.waiter_ids = itertools.count()
        self.ops = itertools.count()
        self.released: Dict[Tuple[str, str], int] = {}  # (pool, host) -> op number of its last release

    @initialize(skews=st.lists(st.sampled_from([-3.0, -1.0, 0.0, 1.5, 3.0]), min_size=SERVERS, max_size=SERVERS),
                placement=st.sampled_from([(0, 0), (0, 1), (1, 0), (1, 1)]),
                holder=st.integers(0, SERVERS - 1), held=st.sampled_from(sorted(POOLS)))
    def start(self, skews: List[float], placement: Tuple[int, int], holder: int, held: str) -> None:
        # A namespace of its own for each run, chosen so that the pools
        # live where the draw says (a replay must place them the same way).
        ring = RendezvousHash(list(self.addresses))
        for attempt in itertools.count():
            namespace = f"sm{self.generation}x{attempt}"
            if tuple(self.addresses.index(ring.get_node(f"{namespace}:pool:{name}"))
                     for name in sorted(POOLS)) == placement:
                break
        pools = "".join(f"  - {{name: {name}, maxlocks: {maxlocks}, expire: {expire}}}\n"
                        for name, (maxlocks, expire) in POOLS.items())
        self.config = parse_config(
            f"backend: memcache\nnamespace: {namespace}\n"
            f"memcache_servers: [{', '.join(repr(a) for a in self.addresses)}]\npools:\n{pools}")
        for index, skew in enumerate(skews):
            self.servers.append(self._new_server(index, skew))
        # Every run starts with a pool held: that is when mistakes show.
        self.get(holder, held, HOSTS[-1], run=True)

    def _new_server(self, index: int, skew: float) -> Server:
        server = Server(self, index, skew)
        self.created[index] = self.step_no
        server._beat_now()  # as at startService
        return server

    def teardown(self) -> None:
        for server in self.servers:
            server.close()

    # -- the model --------------------------------------------------------------

    def wall(self) -> float:
        """True time: the machine's clock, and a microsecond more at each look
        (time passes between two calls)."""
        return self.wall0 + self.now + next(self.micros) * 1e-6

    def violated(self, what: str) -> None:
        self.violations.append(what)
        raise AssertionError(what)

    def observe(self, event: Any) -> None:
        """Every event a server commits, in the order of the writes."""
        if event.kind == GRANTED:
            last = self.max_token.get(event.pool, 0)
            if event.token <= last:
                self.violated(f"token {event.token} of {event.pool} after {last}")
            self.max_token[event.pool] = event.token
        if event.ticket is not None and event.kind in (GRANTED, RENEWED):
            if self.stamp is None:
                self.violated(f"{event} outside any transaction")
            self.applied[(event.pool, event.ticket)] = (event.kind, event.token, self.stamp)

    def _believe(self, pool: str, host: str, since: float, op: int) -> None:
        key = (pool, host)
        if self.released.get(key, -1) > op:
            return  # the client has sent /release since it asked: it knows it does not hold
        until = since + POOLS[pool][1]
        self.beliefs[key] = max(self.beliefs.get(key, until), until)
        self._check_safety()

    def _check_safety(self) -> None:
        for pool, (maxlocks, _) in POOLS.items():
            holders = sorted(h for (p, h), until in self.beliefs.items() if p == pool and until > self.now)
            if len(holders) > maxlocks:
                self.violated(f"{holders} all hold {pool} at {self.now}")

    # -- driving transactions ---------------------------------------------------

    def _advance(self, txn: Txn) -> None:
        try:
            phase = next(txn.gen)
        except StopIteration as done:
            self.inflight.remove(txn)
            self.stamp = txn.applied_at
            try:
                txn.deferred.callback(done.value)
            finally:
                self.stamp = None
            return
        except BaseException:
            self.inflight.remove(txn)
            txn.deferred.errback(Failure())
            return
        if phase == APPLIED:
            txn.applied_at = self.now

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 1000))
    def step(self, pick: int) -> None:
        self._advance(self.inflight[pick % len(self.inflight)])

    @precondition(lambda self: self.inflight)
    @rule()
    def finish_all(self) -> None:
        self._run_all()

    def _run_all(self) -> None:
        for _ in range(200):
            if not self.inflight:
                break
            self._advance(self.inflight[0])

    # -- clients -----------------------------------------------------------------

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)), host=st.sampled_from(HOSTS),
          run=st.booleans())
    def get(self, index: int, pool: str, host: str, run: bool) -> None:
        d = self.servers[index].get(pool, host, "")
        d.addCallback(self._got, pool, host, next(self.ops))
        d.addErrback(self._failed)
        if run:
            self._run_all()

    def _got(self, hold: Any, pool: str, host: str, op: int) -> None:
        if isinstance(hold, Hold):
            if self.stamp is None:
                self.violated("a grant outside any transaction")
            self._believe(pool, host, self.stamp, op)

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)), host=st.sampled_from(HOSTS),
          run=st.booleans())
    def wait(self, index: int, pool: str, host: str, run: bool) -> None:
        server = self.servers[index]
        waiter_id = next(self.waiter_ids)
        d = server.wait(pool, host, "")
        self.waiters[waiter_id] = (server, d, pool, host)
        d.addCallbacks(self._waited, self._not_waited, callbackArgs=(waiter_id, pool, host, next(self.ops)),
                       errbackArgs=(waiter_id,))
        if run:
            self._run_all()

    def _waited(self, event: Any, waiter_id: int, pool: str, host: str, op: int) -> None:
        if waiter_id in self.answered:
            self.violated("a /wait answered twice")
        self.answered.add(waiter_id)
        self.waiters.pop(waiter_id, None)
        applied = self.applied.get((pool, event.ticket))
        if applied is None:
            self.violated(f"/wait {event.ticket} answered without its own transition")
            return
        kind, token, at = applied
        if token != event.token:
            self.violated(f"/wait {event.ticket} answered {event.token}, its transition gave {token}")
        # The lease counts from the grant, or from the delivery when another
        # server granted it (the delivering transaction renews it).
        self._believe(pool, host, self.stamp if self.stamp is not None else at, op)

    @precondition(lambda self: self.beliefs)
    @rule(pick=st.integers(0, 1000), index=st.integers(0, SERVERS - 1), again=st.sampled_from(["get", "wait"]),
          run=st.booleans())
    def holder_asks_again(self, pick: int, index: int, again: str, run: bool) -> None:
        """A holder renews its lease, with /get or /wait, through any server."""
        pool, host = sorted(self.beliefs)[pick % len(self.beliefs)]
        getattr(self, again)(index, pool, host, run)

    def _not_waited(self, failure: Failure, waiter_id: int) -> None:
        self.waiters.pop(waiter_id, None)
        self._failed(failure)

    def _failed(self, failure: Failure) -> None:
        """A request that failed: ERROR (the store) or a hang-up are fine;
        anything else is a bug (or a violation found inside a callback)."""
        if not failure.check(BackendUnavailable, CancelledError):
            if not self.violations:
                self.violations.append(failure.getTraceback())

    @precondition(lambda self: self.waiters)
    @rule(pick=st.integers(0, 1000))
    def hang_up(self, pick: int) -> None:
        waiter_id = sorted(self.waiters)[pick % len(self.waiters)]
        _, d, _, _ = self.waiters.pop(waiter_id)
        d.cancel()

    @rule(index=st.integers(0, SERVERS - 1), pool=st.sampled_from(sorted(POOLS)), host=st.sampled_from(HOSTS))
    def release(self, index: int, pool: str, host: str) -> None:
        # The client stops using the resource before it asks.
        self.beliefs.pop((pool, host), None)
        self.released[(pool, host)] = next(self.ops)
        self.servers[index].release(pool, host).addErrback(self._failed)

    # -- background work, time ---------------------------------------------------

    @rule(index=st.integers(0, SERVERS - 1))
    def poll(self, index: int) -> None:
        self.servers[index]._poll()

    @rule(index=st.integers(0, SERVERS - 1))
    def beat(self, index: int) -> None:
        self._beat(self.servers[index])

    def _beat(self, server: Server) -> None:
        server._beat_now()
        for node, step in self.last_loss.items():
            if self.created[server.index] < step:
                self.reacted.add(node)

    @rule(seconds=st.sampled_from([0.3, 1.0, 2.5, 6.0]))
    def advance(self, seconds: float) -> None:
        # Live servers beat every second: split the time into seconds.
        while seconds > 0:
            dt = min(1.0, seconds)
            seconds -= dt
            self.now += dt
            for server in self.servers:
                server.clock.advance(dt)
            for server in self.servers:
                self._beat(server)

    @rule(index=st.integers(0, SERVERS - 1), skew=st.sampled_from([-3.0, 0.0, 3.0, -60.0, 60.0]))
    def set_clock(self, index: int, skew: float) -> None:
        """A server's wall clock is stepped (beyond MAX_CLOCK_SKEW, or back),
        and it measures it against memcached's at once."""
        server = self.servers[index]
        server.skew = skew
        for node in server.nodes.values():
            try:
                server._measure(node)
            except BackendUnavailable:
                pass

    # -- failures -------------------------------------------------------------------

    @rule(which=st.integers(0, 1))
    def restart_memcached(self, which: int) -> None:
        memcached = self.memcacheds[which]
        memcached.kill()
        memcached.start()
        self._lost(memcached.address)

    @rule(which=st.integers(0, 1))
    def flush_memcached(self, which: int) -> None:
        memcached = self.memcacheds[which]
        memcached.flush()
        self.flushes[memcached.address] += 1
        self._lost(memcached.address, restarted=False)

    def _lost(self, address: str, restarted: bool = True) -> None:
        self.step_no += 1
        if restarted:
            self.node_started[address] = self.now
        self.last_loss[address] = self.step_no
        self.reacted.discard(address)

    def _restartable(self, index: int) -> bool:
        """Some other live server saw each node before its last loss, or
        one has already dealt with the loss."""
        for node, step in self.last_loss.items():
            if node in self.reacted:
                continue
            if not any(self.created[i] < step for i in range(SERVERS) if i != index):
                return False
        return True

    @rule(which=st.integers(0, 1), index=st.integers(0, SERVERS - 1))
    def restart_memcached_and_server(self, which: int, index: int) -> None:
        """Both go down together (one machine), and come back."""
        self.restart_memcached(which)
        self.restart_server(index)

    @rule(index=st.integers(0, SERVERS - 1))
    def restart_server(self, index: int) -> None:
        if not self._restartable(index):
            return
        old = self.servers[index]
        self.inflight = [t for t in self.inflight if t.server is not old]
        self.waiters = {k: w for k, w in self.waiters.items() if w[0] is not old}
        old.close()
        self.step_no += 1
        self.servers[index] = self._new_server(index, old.skew)

    @invariant()
    def safety(self) -> None:
        assert not self.violations, self.violations
        self._check_safety()


_generations = itertools.count()


@pytest.fixture
def two_memcacheds():
    started = [Memcached(), Memcached()]
    yield started
    for m in started:
        m.kill()


def test_memcache_backend_state_machine(two_memcacheds):
    MemcacheMachine.memcacheds = two_memcacheds
    run_state_machine_as_test(MemcacheMachine, settings=settings(
        max_examples=120, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
