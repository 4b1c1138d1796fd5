"""Pool states kept in memcached, shared by several distributex servers.

Every change is one compare-and-swap transaction on the pool's record: read
it with ``gets``, apply the pool rules (distributex.pool, the same rules as
the in-memory backend), write it back with ``cas`` (``add`` when there was
none). A conflict means another server changed the pool in between: the
transaction starts again from the fresh record, a bounded number of times,
after a short random pause. Nothing is ever written without CAS, so two
servers can never both grant the last slot. A pool always lives on the same
memcached (rendezvous hashing over the configured list, never re-hashed
when one is down: then its pools answer ERROR).

The queue is not in the record: each waiter has a key of its own,
``NS:q:EPOCH:SEQ`` (its host, session, label, server, ...), on the pool's
memcached, and the record counts the places: ``seq`` the next place, ``lo``
the head (every place below it is done), ``x`` the places between that were
left, ``nt`` more left places (a place in ``x`` gets a tombstone on its
key after the write that left it; past LEFT_LISTED listed places, a
transaction reads their keys and only counts those with a tombstone, and
puts one on the others), ``rs`` the places dropped by the last reset of the
whole pool, and ``e`` the epoch that names the keys (a record created
afresh starts a new set). So the record stays small (the holders, and at
most about LEFT_LISTED left places), and a transaction reads only the head
of the queue: the first maxlocks + QUEUE_WINDOW unlisted places (in the
same round trip as the record, from where the last one stood), more only
when the rules run past them, and the head moves past tombstones only when
they reach it; the places of the tickets it leaves with; every unlisted
place only for /status/ and for dropping every waiter. The rules
only ever look at the head, and judge max_waiters on the count. The record
is the truth: a place is taken, left or passed by the record's CAS alone.
A new waiter's key is written right after the record that gives it its
place (with ``add``, so that it never covers a tombstone): a reader that
finds the place counted but the key not there yet reads it again, then
waits (MISSING_RECHECK), and only a key missing for MISSING_GRACE (its
server died between the two writes) is skipped. Keys of passed places are
deleted after the record's write. A read that covers every place not
listed in ``x`` counts the tombstones it saw, and so corrects ``nt``.

A server runs one transaction per pool at a time; the operations on that
pool that arrive meanwhile go together in the next one (MAX_BATCH): 5,000
/wait arriving at once cost a few dozen transactions, not 5,000 that the
other servers' CAS would keep failing.

Transactions run in a bounded thread pool, because pymemcache blocks; the
reactor thread only hands answers to waiting connections. A transaction is
a generator of phases (read, apply, write the record, write the waiter
keys) so that tests can interleave the phases of several servers.

Loss of data (rules 1-3). memcached forgets everything when it restarts, is
flushed or evicts, and a forgotten holder may still be working:

1. Every memcached ("node") carries a marker key, ``NS:node``, whose value
   names the node's incarnation. It is created once, with ``add``, and never
   overwritten; every pool record carries the incarnation it was written
   under. Each transaction reads the record and the marker in one round
   trip (both live on the pool's node), and the heartbeat reads every
   node's marker every second.
2. A server remembers the marker it last saw on each node. The node lost its
   data when the marker is gone or differs from the one remembered, or when
   a record names another incarnation than the marker (it outlived a lost
   marker, or was written by an ``add`` that landed on the restarted node:
   after an ``add`` the writer reads the marker again and answers ERROR if
   it changed). The server that notices first writes, with ``add``/``cas``,
   a blocked record for every pool it knows on that node, and only then
   adds a new, settling marker (rule 3); every other server that
   remembered the old marker does the same for its pools (or, where the
   pool is blocked already, raises its token floor, rule 5) before it
   touches the node again. A blocked pool grants nothing for one lock-delay:
   max(its lease, LOCK_DELAY_MIN); the /wait and /get that find it so are
   answered at once (NO, "lock-delay until T"). A record that vanished
   while its marker stayed (an eviction: run memcached with -M) is blocked
   by any server that had read it. What a server remembers (the marker,
   the pools it read under it) changes only once the blocks are written.
3. A server that remembers no marker and finds none cannot tell a brand-new
   cluster from a total loss. It decides with memcached's own ``stats``: a
   node that has been up MARKER_SETTLE seconds and was never flushed and
   never evicted gets a marker in use at once (a new namespace: no delay).
   Any other node gets a *settling* marker: nothing on it that could be
   granted is answered until MARKER_SETTLE seconds after each server first
   saw the marker (the requests wait), which gives every live server that
   remembers the old marker five heartbeats to write its blocks. So a
   server started together with (or after) a restarted or flushed memcached
   does not grant what a running server remembers: a brand-new marker costs
   a lock-delay only if some server remembers a marker. The unavoidable
   case: when no running server remembers the node (all were down, or hung
   for longer than MARKER_SETTLE, when it lost its data), a lost hold cannot
   be known, exactly as at a first start.

Leases are timed by observation (rule 4). Servers' wall clocks differ, so a
record holds no deadline: a hold carries its lease length, and its version
(token, renewals) is timed by each server from the moment that server first
saw it, on its own monotonic clock (CLOCK_BOOTTIME); the record's times are
translated into that clock before the pool rules run. No server ends a hold
earlier than ``expire`` after its grant or last renewal (every server first
sees a version after it was written); the first server whose own count has
run out ends it for everyone. A lock-delay is timed the same way, from when
each server first saw the block. Liveness cost: a server that first sees a
hold late (it started, or had not read the pool) counts a whole lease from
then: at most one extra lease, and only when no server that saw the hold
earlier touches the pool. The table of first sightings keeps only what the
records last read hold, so it stays bounded.

Fencing tokens across a lost record (rule 5). Every record a server creates,
and every lock-delay it ends, raises the pool's last token to
max(the last token this server saw for the pool, its wall clock in µs +
TOKEN_FLOOR_MARGIN), and a server that finds a pool blocked for a loss it
noticed raises it to its own floor too. That exceeds every token granted
before, whatever server granted it, provided each server's clock is within
MAX_CLOCK_SKEW of the pool's memcached clock (so within 2 x MAX_CLOCK_SKEW of
each other) and a lock-delay lasts longer than 2 x MAX_CLOCK_SKEW
(LOCK_DELAY_MIN, so that the tokens drawn from one floor are older than the
next floor's margin). Each server measures its offset to every memcached's
clock at start, every heartbeat, and before a transaction when the last
sample is older than CLOCK_RECHECK: ``stats`` gives memcached's time in
whole seconds that lag its clock by up to MEMCACHED_TIME_LAG, so a sample is
an interval, and the samples of the last CLOCK_SAMPLES heartbeats are
intersected. Past the bound (the interval's far end) it logs at critical
level and answers ERROR (503) for the pools of that memcached, granting
nothing (its local waiters on them get ERROR too), and /health answers
ERROR, until it is back within bound. A clock stepped between two samples
goes unnoticed for up to a heartbeat.

Across servers:

- each server marks itself alive on every node with a key that expires
  unless refreshed (``PRESENCE_TTL``); queued tickets and undelivered answers
  name their server, and those of a server that has gone are dropped (a
  grant nobody was told of is given back) by whichever server next touches
  the pool, once it has seen them for PRESENCE_TTL or they queued longer
  ago than that (by the clocks, within the skew bound). A transaction
  reads only the head of the queue, so a dead server's waiters leave when
  they reach it: until then /status/ lists them and they count against
  max_waiters;
- a local /wait is answered only by its own transition: its enqueue's own
  grant or renewal, or the answer another server left in the record, taken
  out by this server's transaction (never inferred from who holds);
- a server polls, every ``poll_interval``, the pools in which it has local
  waiters (one transaction per pool, whatever their number), to take the
  answers other servers left for them (a release through this server hands
  over at once, without a poll); a local waiter whose place the head passed
  with no answer for it (skipped, dropped as a dead server's, lost with the
  record), or whose place names an older epoch, queues again at the back;
  one below ``rs`` was dropped by a reset and gets NO.

Every in-process deadline (leases, blocks, settling, presence freshness,
ticket ages, clock re-measurement) is on the monotonic clock; the wall clock
is used only for tokens and for the times /status/ shows. (The reactor's
own timers, which pace the polls and heartbeats, follow its clock.)

A record in another format (an older distributex) counts as lost: upgrade
every server of a cluster together.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections import deque
from typing import (AbstractSet, Any, Callable, Deque, Dict, FrozenSet, Generator, List, Optional, Sequence, Set,
                    Tuple, cast)

from pymemcache.client.base import PooledClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from distributex.backend.base import (ANSWERED, LEFT, Backend, BackendUnavailable, Operation, QueueFull, _leave_all,
                                      partial_spec)
from distributex.config import DEFAULT_EXPIRE, Config, PoolSpec
from distributex.pool import (BLOCKED, GRANTED, LAPSED, QUEUED, RENEWED, RESET, Answer, Event, Hold, Pool, PoolState,
                             Step, Ticket, queue_full)
from distributex.token import TOKEN_RESOLUTION

#: A server refreshes its presence keys (and reads every node's marker and
#: clock) this often ...
PRESENCE_REFRESH = 1.0
#: ... and the keys live this long (memcached counts whole seconds), so a
#: dead server's waiters lose their places within about five seconds, while
#: a live one survives a few slow refreshes.
PRESENCE_TTL = 5
#: How long a node without a marker settles before anything on it is
#: granted, unless memcached's stats show it can have lost nothing: time for
#: every running server that remembers the node to write its blocks.
MARKER_SETTLE = float(PRESENCE_TTL)
#: The largest offset allowed between a server's wall clock and a
#: memcached's clock; past it the server grants nothing on that memcached.
MAX_CLOCK_SKEW = 5.0
#: Tokens of a record created afresh start this far past the creating
#: server's clock: two servers within MAX_CLOCK_SKEW of memcached are within
#: twice that of each other.
TOKEN_FLOOR_MARGIN = 2 * MAX_CLOCK_SKEW
#: The shortest lock-delay: tokens drawn from one floor must be older than
#: the next floor's margin (see the module docstring).
LOCK_DELAY_MIN = 2 * MAX_CLOCK_SKEW + 1.0
#: memcached's ``time`` stat is whole seconds and is updated once a second:
#: it lags its clock by up to this much.
MEMCACHED_TIME_LAG = 2.0
#: Clock samples intersected (one per heartbeat).
CLOCK_SAMPLES = 16
#: A transaction measures the clock again first when the last sample is older.
CLOCK_RECHECK = 10.0
#: CAS attempts before a transaction gives up with ERROR: contention among a
#: handful of servers settles in two or three.
MAX_CAS_ATTEMPTS = 12
#: The first retry pause; it doubles with each attempt, with full jitter.
CAS_BACKOFF = 0.001
#: Threads doing memcached calls: enough to overlap round trips, few enough
#: that a hung memcached cannot eat the machine.
MAX_THREADS = 8
#: pymemcache connect and read timeout: a memcached that does not answer in
#: a second is treated as down (ERROR, 503) rather than stalling a request.
MEMCACHE_TIMEOUT = 1.0
#: The record format; a record in another one counts as lost.
RECORD_VERSION = 3

#: Waiter keys a transaction reads beyond the pool's slots: the rules look
#: only at the head of the queue, so a change costs maxlocks + this many
#: keys whatever the queue's length (it reads more when the head runs out).
QUEUE_WINDOW = 8
#: Waiter keys per get_many when a whole queue is read (/status/, a reset).
READ_CHUNK = 500
#: A waiter key that its record counts but that is not there is being
#: written by its server, right after its change to the record: it is read
#: again this many times, a few milliseconds apart, ...
MISSING_RETRIES = 3
#: ... then the transaction waits MISSING_RECHECK and starts again; a key
#: still missing after MISSING_GRACE was lost (its server died between its
#: two writes, or memcached evicted it: run it with -M): its place is skipped.
MISSING_RECHECK = 0.05
MISSING_GRACE = 1.0
#: Left places the record lists at most (``x``) before a transaction checks
#: their keys (tombstones written by the leavers) and only counts them
#: (``nt``): waiters leaving behind a head that stays keep the record small.
LEFT_LISTED = 256
#: What a left place's key holds once its leaver has written it.
TOMBSTONE = b"-"

#: Operations on one pool from one server applied in one transaction at
#: most: 5,000 /wait arriving together take a few dozen transactions, not
#: 5,000 (which the other servers' CAS would keep failing), and one
#: transaction's reads and writes stay small.
MAX_BATCH = 256

#: Marker states: settling (nothing granted yet) or in use.
SETTLING = "settling"
IN_USE = "ok"

#: The phases a transaction yields after (see MemcacheBackend._txn).
READ = "read"
APPLIED = "applied"
WRITTEN = "written"

Marker = Tuple[str, str, float]  # incarnation, state, settling seconds
Block = Tuple[str, float]  # block id, lock-delay seconds


def monotonic_clock() -> Callable[[], float]:
    """CLOCK_BOOTTIME where there is one: monotonic, and it counts a suspend."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


class _ConnectionFailed(BackendUnavailable):
    """The connection failed at once (refused, reset, closed): worth another try."""


class _NotYet(Exception):
    """The pool's node is settling: try again in ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


def make_nodes(servers: Tuple[Tuple[str, int], ...]) -> Dict[str, Any]:
    """One pooled client per memcached, by "host:port"."""
    return {f"{host}:{port}": PooledClient(
        (host, port), connect_timeout=MEMCACHE_TIMEOUT, timeout=MEMCACHE_TIMEOUT,
        no_delay=True, default_noreply=False) for host, port in servers}


class _Node:
    """One memcached, and what this server knows of it."""

    def __init__(self, address: str, client: Any) -> None:
        self.address = address
        self.client = client
        # Serializes this server's view of the node across worker threads.
        self.lock = threading.RLock()
        self.incarnation: Optional[str] = None  # the marker this server last accepted
        # Counts changes of ``incarnation``: a marker read before a change
        # is stale, and is read again rather than taken for a loss.
        self.version = 0
        self.seen: Set[str] = set()  # pools whose record it read under that marker
        self.settling: Dict[str, float] = {}  # settling marker -> when first seen
        self.samples: Deque[Tuple[float, float]] = deque(maxlen=CLOCK_SAMPLES)
        self.offset: Optional[Tuple[float, float]] = None  # memcached clock - ours, bounds
        self.measured_at: Optional[float] = None
        self.skewed = False
        # When the newest sample added was started (monotonic): an older one
        # that reaches the lock later knows less and is dropped.
        self.sample_started = float("-inf")


class _Record:
    """A pool record decoded into this server's monotonic time, with the
    head of its queue, and what a transaction changes in it."""

    __slots__ = ("state", "incarnation", "loss", "block", "walls", "fresh", "epoch", "lo", "seq", "left", "nt", "rs",
                 "created", "wall", "old_obs", "seqs", "head", "skip", "tombs", "compact", "unmarked", "repaired",
                 "hidden", "partial", "placed", "passed", "buried")

    def __init__(self, state: PoolState, incarnation: Optional[str], loss: Optional[str],
                 block: Optional[Block], walls: Dict[tuple, float], epoch: str, lo: int = 0, seq: int = 0,
                 left: Optional[Set[int]] = None, nt: int = 0, rs: int = 0) -> None:
        self.state = state
        self.incarnation = incarnation  # the node's marker when it was written
        self.loss = loss  # the last node incarnation whose lock-delay this pool took
        self.block = block
        self.walls = walls  # wall times as stored, for the times /status/ shows
        # What this transaction writes for the first time (new lease
        # versions, a new block), and when: first seen only once written.
        self.fresh: Dict[tuple, float] = {}
        # The queue: waiter keys NS:q:EPOCH:SEQ for SEQ in [lo, seq), but
        # for the places in ``left`` and ``nt`` more left places whose keys
        # are tombstones; the waiters placed below ``rs`` were dropped by a
        # reset. A new epoch (a record created afresh) starts a new set of keys.
        self.epoch = epoch
        self.lo = lo
        self.seq = seq
        self.left = left if left is not None else set()
        self.nt = nt
        self.rs = rs
        self.created = False
        self.wall = 0.0  # the wall clock when it was read
        self.old_obs: Dict[tuple, float] = {}  # first sightings before this read
        self.seqs: Dict[str, int] = {}  # the waiters read: ticket id -> place
        self.head: Set[str] = set()  # those of them read as the head of the queue
        self.skip: Set[int] = set()  # places found with no waiter key: skipped
        self.tombs: Set[int] = set()  # places read with a tombstone (counted in nt)
        self.compact: Set[int] = set()  # listed left places found with a tombstone: counted in nt from now
        self.unmarked: List[int] = []  # listed left places found without one: it is written
        self.repaired = False  # nt was set right by a read of every unlisted place
        self.hidden = 0  # waiters behind the head that were not read, as counted
        self.partial = False  # places were left unread (at least one may be a waiter)
        self.placed: List[Tuple[str, int, Ticket, bytes]] = []  # new waiters: id, place, ticket, key value
        self.passed = (0, 0)  # the places the head moved past: their keys are deleted
        self.buried: List[int] = []  # places this transaction left: tombstones are written

    @property
    def count(self) -> int:
        """The waiters in the queue."""
        return self.seq - self.lo - len(self.left) - self.nt


class Result:
    """What a transaction answers: the steps, the state after them (with the
    part of the queue read), the answers it took for this server's tickets,
    its time on the monotonic clock, and where the queue stands."""

    __slots__ = ("steps", "state", "answers", "now", "placed", "epoch", "lo", "rs")

    def __init__(self, steps: List[Step], record: _Record, answers: Dict[str, Answer], now: float) -> None:
        self.steps = steps  # one per operation of the batch
        self.state = record.state
        self.answers = answers
        self.now = now
        self.placed = record.placed
        self.epoch = record.epoch
        self.lo = record.lo
        self.rs = record.rs


class _Op:
    """One operation on a pool: the rule, and what its transaction must read
    besides the head of the queue."""

    __slots__ = ("fn", "leaving", "requeue", "full", "state", "now", "refused")

    def __init__(self, fn: Operation, leaving: Sequence[str] = (), requeue: Sequence[Ticket] = (),
                 full: bool = False) -> None:
        self.fn = fn
        self.leaving = leaving  # local tickets leaving: their places are read
        self.requeue = requeue  # local tickets to queue again if they lost their places
        self.full = full  # the whole queue (/status/, dropping every waiter)
        self.state: Optional[PoolState] = None  # the state and time it was applied at
        self.now = 0.0
        self.refused: List[str] = []  # tickets to queue again that found the queue full


def _read_marker(raw: Optional[bytes]) -> Optional[Marker]:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return str(data["i"]), str(data["s"]), float(data["w"])
    except (ValueError, KeyError, TypeError):
        # Not ours: a marker that cannot be read is as good as a lost one.
        return ("?" + raw.hex()[:32], IN_USE, 0.0)


def _marker(incarnation: str, state: str, settle: float = MARKER_SETTLE) -> bytes:
    return json.dumps({"i": incarnation, "s": state, "w": settle}, separators=(",", ":")).encode()


def _drive(transaction: Generator[str, None, "Result"]) -> "Result":
    """Run a transaction's phases to the end."""
    while True:
        try:
            next(transaction)
        except StopIteration as done:
            return done.value


class MemcacheBackend(Backend):
    shared = True

    def __init__(self, config: Config, reactor: IReactorTime, nodes: Optional[Dict[str, Any]] = None,
                 mono: Optional[Callable[[], float]] = None, wall: Optional[Callable[[], float]] = None) -> None:
        super().__init__(config.pools, reactor)
        self.namespace = config.namespace
        self.poll_interval = config.poll_interval
        self.mono = mono if mono is not None else monotonic_clock()
        self.wall = wall if wall is not None else time.time
        clients = nodes if nodes is not None else make_nodes(config.memcache_servers)
        self.nodes = {address: _Node(address, client) for address, client in clients.items()}
        # The same placement as pymemcache's HashClient, and never re-hashed.
        self._ring = RendezvousHash(list(self.nodes))
        self._node_of: Dict[str, _Node] = {}
        self.threads = ThreadPool(minthreads=1, maxthreads=MAX_THREADS, name="distributex-memcache")
        # One transaction per pool at a time from this server: the local
        # requests that arrive meanwhile wait here, and go together in the
        # next one instead of fighting each other with CAS.
        self._batches: Dict[str, List[Tuple[_Op, Deferred]]] = {}
        self._running: Set[str] = set()
        # Pools this server has touched, and when last (monotonic): a loss
        # blocks them too. Pools made on demand are forgotten once no hold
        # this server saw in them can still run.
        self._used: Dict[str, float] = {}
        # When this server first saw each thing in a pool's record (lease
        # versions, blocks, tickets, answers), on its monotonic clock.
        self._obs: Dict[str, Dict[tuple, float]] = {}
        self._last_token: Dict[str, int] = {}  # the highest token seen, by pool
        self._blocked: Dict[str, float] = {}  # pool -> end of its lock-delay, as last seen
        self._busy: Set[str] = set()  # pools whose record last read had holders or waiters
        # Events of work done outside a pool's own transaction (the blocks a
        # loss wrote), told to observers on the reactor thread.
        self._pending_events: List[Event] = []
        self._pending_lock = threading.Lock()
        self._presence: Dict[Tuple[str, str], Tuple[bool, float]] = {}  # (node, server) -> (alive, checked)
        # Tickets that left locally but whose leave has not reached
        # memcached yet (it was down): retried by the poller.
        self._orphans: Dict[str, str] = {}  # ticket id -> pool
        # Our waiters with a place in their pool's queue, by pool, in the
        # order of their places; where each place is (written by the
        # transaction that took it); and those whose place was passed with
        # no answer (see _passed), which the poller queues again.
        self._mine: Dict[str, Dict[str, Ticket]] = {}
        self._placed: Dict[str, Tuple[str, str, int]] = {}  # ticket id -> pool, epoch, place
        self._lost_local: Dict[str, Set[str]] = {}
        # The head of each pool's queue as last seen: read ahead with the record.
        self._heads: Dict[str, Tuple[str, int, int, FrozenSet[int]]] = {}
        # Waiter keys found missing, and since when: pool -> epoch, place -> time (see _read_waiters).
        self._missing: Dict[str, Tuple[str, Dict[int, float]]] = {}
        self._polling: Set[str] = set()
        self._stopping = False
        self._poller = LoopingCall(self._poll)
        self._heartbeat = LoopingCall(self._beat)

    # -- keys and places -----------------------------------------------------------

    def _pool_key(self, name: str) -> str:
        return f"{self.namespace}:pool:{name}"

    def _server_key(self, server_id: str) -> str:
        return f"{self.namespace}:server:{server_id}"

    @property
    def _marker_key(self) -> str:
        return f"{self.namespace}:node"

    def _node(self, name: str) -> _Node:
        node = self._node_of.get(name)
        if node is None:
            node = self._node_of[name] = self.nodes[self._ring.get_node(self._pool_key(name))]
        return node

    def _spec(self, name: str) -> Optional[PoolSpec]:
        find = getattr(self.pools, "find", None)
        return find(name) if find is not None else self.pools.get(name)

    def _pools_on(self, node: _Node) -> List[str]:
        """The pools this server knows (configured, or used) that live on the node."""
        return sorted(name for name in set(self.pools) | set(self._used) if self._node(name) is node)

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.threads.start()
        self._heartbeat.start(PRESENCE_REFRESH, now=True).addErrback(self._crashed, "heartbeat")
        self._poller.start(self.poll_interval, now=False).addErrback(self._crashed, "poller")

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for loop in (self._poller, self._heartbeat):
            if loop.running:
                loop.stop()
        leaving = [self._leave(pool, tickets) for pool, tickets in self._answer_waiters().items()]
        d = DeferredList(leaving, consumeErrors=True)
        # Other servers may drop our remaining tickets at once instead of
        # waiting for the presence keys to expire.
        d.addCallback(lambda _: self._in_thread(self._clear_presence))
        d.addErrback(lambda f: self.log.warn("could not clear this server's presence: {f.value}", f=f))
        d.addBoth(lambda _: self.threads.stop())
        return d

    def _crashed(self, failure: Any, what: str) -> None:
        self.log.failure("the memcache {what} stopped", failure, what=what)

    # -- operations ----------------------------------------------------------------

    def _in_thread(self, f: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(cast(Any, self.reactor), self.threads, f, *args)

    def _run(self, name: str, op: "_Op") -> Deferred:
        """Apply the operation in the pool's next transaction from this
        server; fire with its Step once committed (and dispatched)."""
        self._used[name] = self.mono()
        d: Deferred = Deferred()
        self._batches.setdefault(name, []).append((op, d))
        if name not in self._running:
            self._next_batch(None, name)
        return d

    def _next_batch(self, _: object, name: str) -> None:
        waiting = self._batches.pop(name, None)
        if not waiting:
            self._running.discard(name)
            return
        batch, rest = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
        if rest:
            self._batches[name] = rest
        self._running.add(name)
        d = maybeDeferred(self._attempt, name, [op for op, _ in batch])
        d.addCallback(self._committed, name)
        d.addCallbacks(_answer_batch, _fail_batch, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(self._next_batch, name)

    def _attempt(self, name: str, ops: List["_Op"]) -> Deferred:
        return self._submit(name, ops).addErrback(self._later, name, ops)

    def _later(self, failure: Failure, name: str, ops: List["_Op"]) -> Deferred:
        """The node is settling, or a waiter key is being written: the
        requests wait, then try again."""
        failure.trap(_NotYet)
        if self._stopping and not all(op.leaving for op in ops):
            # (Leaving still waits: a stopping server must not leave places behind.)
            raise BackendUnavailable("the server is stopping")
        delay = cast(_NotYet, failure.value).delay
        return deferLater(self.reactor, delay, self._attempt, name, ops)

    def _submit(self, name: str, ops: List["_Op"]) -> Deferred:
        """Run one transaction (a hook: tests run the phases themselves)."""
        return self._in_thread(self._transact, name, ops)

    def _transact(self, name: str, ops: List["_Op"]) -> "Result":
        return _drive(self._txn(name, ops))

    def _apply(self, name: str, operation: Operation) -> Deferred:
        return self._run(name, _Op(operation))

    def reset(self, pool: str, host: Optional[str] = None, session: Optional[str] = None,
              origin: str = "") -> Deferred:
        # Dropping every waiter reads the whole queue: each one gets its NO.
        return self._run(pool, _Op(lambda p, now: p.reset(now, host, session, origin), full=host is None))

    def _snapshot(self, name: str) -> Deferred:
        op = _Op(_tick, full=True)
        return self._run(name, op).addCallback(lambda _: (self._spec(name), op.state, op.now))

    def health(self) -> Deferred:
        """Every memcached answers, and this server's clock agrees with theirs."""
        return self._in_thread(self._healthy)

    def _healthy(self) -> bool:
        try:
            for node in self.nodes.values():
                self._call(node.client.get, self._marker_key)
                self._check_clock(node)
        except BackendUnavailable:
            return False
        return True

    def lock_delays(self) -> Dict[str, float]:
        now = self.mono()
        return {name: until - now for name, until in list(self._blocked.items()) if until > now}

    def active_pools(self) -> List[str]:
        named = list(self.pools)
        return named + sorted(self._busy - set(named))

    def _committed(self, result: "Result", name: str) -> "Result":
        now = result.now
        self._flush_events()
        # Answers taken for tickets that had left before this commit (not
        # those its own steps answer) were never told: given back below.
        untold = [(ticket_id, answer.token) for ticket_id, answer in result.answers.items()
                  if answer.kind == GRANTED and ticket_id not in self._tickets]
        for step in result.steps:
            self._dispatch(step)
        # Outcomes that other servers gave our tickets: the transaction took
        # them out of the record, so each is delivered once, here.
        for ticket_id, answer in result.answers.items():
            local = self._tickets.get(ticket_id)
            if local is None:
                continue
            if answer.kind == LAPSED:
                # Its grant ended before anyone was told: the connection
                # still waits, and queues again.
                self._lost_local.setdefault(name, set()).add(ticket_id)
                continue
            token = None if answer.kind == RESET else answer.token  # a dropped waiter: NO
            # (Delivered, or dropped by a reset: _close and _deliver forget its place.)
            self._deliver(ticket_id, Event(answer.kind, name, local.host, "", token, ticket_id, now, local.session))
        mine = self._mine.get(name)
        for ticket_id, _, ticket, _ in result.placed:
            if ticket_id in self._tickets:
                if mine is None:
                    mine = self._mine[name] = {}
                mine.pop(ticket_id, None)
                mine[ticket_id] = ticket  # placed in seq order: see below
        if mine:
            self._passed(name, mine, result)
        self._give_back(name, result.state, untold)
        return result

    def _passed(self, name: str, mine: Dict[str, Ticket], result: "Result") -> None:
        """Our waiters that the queue's head has passed with no answer for
        them: dropped by an operator's reset (NO), or lost (skipped, taken
        for a dead server's, lost with the record): they queue again.

        ``mine`` is in the order of their places, so this looks at the
        passed ones and one more: its cost does not grow with the queue."""
        epoch, lo, rs = result.epoch, result.lo, result.rs
        passed = []
        for ticket_id in mine:
            placed = self._placed.get(ticket_id)
            if placed is not None and placed[1] == epoch and placed[2] >= lo:
                break
            passed.append((ticket_id, placed))
        for ticket_id, placed in passed:
            if placed is not None and placed[1] == epoch and placed[2] < rs:
                local = self._tickets[ticket_id]
                self._deliver(ticket_id, Event(RESET, name, local.host, "", None, ticket_id, result.now,
                                               local.session))
            else:
                self._lost_local.setdefault(name, set()).add(ticket_id)

    def _flush_events(self) -> None:
        if self._pending_events:
            step = Step()
            with self._pending_lock:
                step.events, self._pending_events = self._pending_events, []
            self._dispatch(step)

    def _close(self, ticket_id: str, state: str) -> Optional[Deferred]:
        local = self._tickets.get(ticket_id)
        if local is not None:
            mine = self._mine.get(local.pool)
            if mine is not None:
                mine.pop(ticket_id, None)
                if not mine:
                    del self._mine[local.pool]
            lost = self._lost_local.get(local.pool)
            if lost is not None:
                lost.discard(ticket_id)
                if not lost:
                    del self._lost_local[local.pool]
        if state is ANSWERED:
            self._placed.pop(ticket_id, None)  # a ticket that left keeps it for its leave
        return super()._close(ticket_id, state)

    def _deliver(self, ticket_id: str, event: Event) -> None:
        super()._deliver(ticket_id, event)
        if event.kind is RESET and event.token is None:
            self._placed.pop(ticket_id, None)  # dropped by a reset: it does not leave

    def _leave(self, pool: str, tickets: List[str]) -> Deferred:
        for ticket_id in tickets:
            self._orphans[ticket_id] = pool
        d = self._run(pool, _Op(lambda p, now: _leave_all(p, tickets, now), leaving=tickets))
        return d.addCallbacks(lambda _: self._left(tickets), lambda f: self.log.error(
            "leaving the queue of {pool}: {f.value}", pool=pool, f=f))

    def _left(self, tickets: List[str]) -> None:
        for ticket_id in tickets:
            self._orphans.pop(ticket_id, None)
            self._placed.pop(ticket_id, None)

    # -- the transaction (runs in a worker thread) --------------------------------

    def _call(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except socket.timeout:
            raise BackendUnavailable(f"memcached did not answer within {MEMCACHE_TIMEOUT:g} s") from None
        except (OSError, MemcacheUnexpectedCloseError) as e:
            raise _ConnectionFailed(f"memcached: {e or type(e).__name__}") from None
        except MemcacheError as e:  # an answer, not a lost connection: retrying will not help
            raise BackendUnavailable(f"memcached: {e or type(e).__name__}") from None

    def _txn(self, name: str, ops: List["_Op"]) -> Generator[str, None, "Result"]:
        """One transaction, as phases: it yields READ once the record (and
        the head of the queue) is read, APPLIED once the rule is applied
        (the write comes next), WRITTEN once the record's write landed (the
        waiter keys come next), and returns the Result.

        After a memcached restart every pooled connection is dead, and each
        fails once, at once, before pymemcache replaces it. Retrying is safe:
        the transaction starts again from a fresh read, and an operation
        whose write did land finds itself done.
        """
        spec = self._spec(name)
        if spec is None:
            raise BackendUnavailable(f"no pool {name!r}")
        node = self._node(name)
        key, marker_key = self._pool_key(name), self._marker_key
        failures = attempts = 0
        window = spec.maxlocks + QUEUE_WINDOW
        while True:
            try:
                self._check_clock(node)
                version = node.version
                # The head of the queue as this server last saw it, read in
                # the same round trip (checked against the record below).
                ahead = self._ahead(name, window)
                got = self._call(node.client.gets_many, [key, marker_key] + ahead)
                yield READ
                now, wall = self.mono(), self.wall()
                raw, cas = got.get(key, (None, None))
                marker = _read_marker(got[marker_key][0] if marker_key in got else None)
                incarnation, settling = self._sync(node, version, marker, raw is not None, now)
                if incarnation is None:
                    # The node's marker was just dealt with: read again.
                    attempts += 1
                    if attempts >= MAX_CAS_ATTEMPTS:
                        raise BackendUnavailable(f"pool {name!r}: memcached {node.address} keeps changing")
                    continue
                asked = set(ahead)
                values = {k: v for k, (v, _) in got.items() if k in asked}
                outcome = None
                while outcome is None:
                    record, lost = self._open(node, spec, incarnation, raw, now, wall)
                    if not self._read_waiters(node, name, record, values, asked, window, ops, cas, now):
                        break  # another server changed the record meanwhile
                    outcome = self._transition(node, spec, incarnation, settling, record, lost, ops, now, wall)
                    if outcome is None:
                        window *= 4  # the rules ran past the head read: read more of the queue
                if outcome is None:
                    attempts += 1
                    if attempts >= MAX_CAS_ATTEMPTS:
                        raise BackendUnavailable(f"pool {name!r}: too much contention")
                    continue
                data, steps, answers = outcome
                yield APPLIED
                if data is None:
                    self._noted(node, name, incarnation, record)
                    return Result(steps, record, answers, now)
                if raw is None:
                    stored = self._call(node.client.add, key, data, noreply=False)
                else:
                    stored = self._call(node.client.cas, key, data, cas, noreply=False)
                if stored:
                    self._obs.setdefault(name, {}).update(record.fresh)
                    if raw is None:
                        self._check_unchanged(node, incarnation)
                    self._noted(node, name, incarnation, record)
                    for ticket_id, seq, _, _ in record.placed:
                        self._placed[ticket_id] = (name, record.epoch, seq)
                    yield WRITTEN
                    self._write_waiters(node, record)
                    return Result(steps, record, answers, now)
                attempts += 1
                if attempts >= MAX_CAS_ATTEMPTS:
                    raise BackendUnavailable(
                        f"pool {name!r}: too much contention ({MAX_CAS_ATTEMPTS} CAS conflicts)")
                time.sleep(random.uniform(0, CAS_BACKOFF * 2 ** attempts))
            except _ConnectionFailed:
                failures += 1
                if failures > MAX_THREADS:
                    raise

    def _open(self, node: _Node, spec: PoolSpec, incarnation: str, raw: Optional[bytes], now: float,
              wall: float) -> Tuple[_Record, Optional[str]]:
        """The record read, decoded; and why it counts as lost, if it does."""
        name = spec.name
        if raw is None:
            record = _Record(PoolState(last_token=self._floor(name, wall)), incarnation, None, None, {}, _epoch())
            record.created = True
            self._obs[name] = {}
            lost = "its record vanished (evicted? run memcached with -M)" if name in node.seen else None
        else:
            record = self._load(name, raw, now, wall)
            lost = None
            if record.incarnation != incarnation and record.loss != incarnation:
                lost = "its record predates the node's marker (the marker was lost)"
        record.wall = wall
        return record, lost

    # -- the queue: one key per waiter ---------------------------------------------

    def _q_key(self, epoch: str, seq: int) -> str:
        return f"{self.namespace}:q:{epoch}:{seq}"

    def _ahead(self, name: str, window: int) -> List[str]:
        view = self._heads.get(name)
        if view is None:
            return []
        epoch, lo, end, left = view
        return [self._q_key(epoch, seq) for seq in _head(lo, end, left, window)]

    def _read_waiters(self, node: _Node, name: str, record: _Record, values: Dict[str, bytes],
                      asked: Set[str], window: int, ops: List["_Op"], cas: Any, now: float) -> bool:
        """Put the head of the queue in the record's state: its first
        ``window`` waiters (all of them for a ``full`` operation), and the
        places of the tickets the operation is leaving with. False when the
        record changed since it was read (read it again).

        A key that the record counts but that is not there is being written
        by its server (it writes it right after the record): read again,
        then wait (_NotYet), and skipped once it has been missing for
        MISSING_GRACE."""
        epoch = record.epoch
        full = any(op.full for op in ops)
        # Every place not listed as left: a waiter, a key being written, or
        # a tombstone counted in nt.
        unlisted = record.seq - record.lo - len(record.left)
        head = _head(record.lo, record.seq, record.left, unlisted if full else window)
        end = head[-1] + 1 if head else record.lo
        extra = []
        for ticket_id in [t for op in ops for t in op.leaving]:
            placed = self._placed.get(ticket_id)
            if (placed is not None and placed[0] == name and placed[1] == epoch and end <= placed[2] < record.seq
                    and placed[2] not in record.left):
                extra.append(placed[2])
        keys = {seq: self._q_key(epoch, seq) for seq in head + extra}
        found = {seq: values[k] for seq, k in keys.items() if k in values}
        unread = [seq for seq, k in keys.items() if k not in asked]
        found.update(self._get_waiters(node, keys, unread))
        missing = [seq for seq in head if seq not in found]
        for attempt in range(MISSING_RETRIES):
            if not missing:
                break
            time.sleep(0.001 * (attempt + 1))
            found.update(self._get_waiters(node, keys, missing))
            missing = [seq for seq in missing if seq not in found]
        if missing:
            if self._call(node.client.gets, self._pool_key(name))[1] != cas:
                return False  # another server moved the queue on meanwhile
            gone = self._missing.get(name)
            if gone is None or gone[0] != epoch:
                gone = self._missing[name] = (epoch, {})
            # Kept until the place is passed (_noted): a wider read, or a
            # conflict, does not start the grace again.
            since = [gone[1].setdefault(seq, now) for seq in missing]
            if now - max(since) < MISSING_GRACE:
                raise _NotYet(MISSING_RECHECK)
            self.log.warn("pool {pool}: waiter places {seqs} were never written (a server died between its "
                          "two writes, or memcached evicted them): skipped", pool=name, seqs=missing)
        record.skip = set(missing) | {seq for seq in extra if seq not in found}
        if len(record.left) > LEFT_LISTED:
            # Listed places whose key holds a tombstone are only counted
            # from now; the others get one after this transaction's write
            # (the record says they are left), for the next one to count.
            listed = sorted(record.left)
            marked = self._get_waiters(node, {seq: self._q_key(epoch, seq) for seq in listed}, listed)
            record.compact = {seq for seq in listed if marked.get(seq) == TOMBSTONE}
            record.unmarked = [seq for seq in listed if marked.get(seq) != TOMBSTONE]
        obs = self._obs.setdefault(name, {})
        state = record.state
        heads = set(head)
        for seq in sorted(found):
            if found[seq] == TOMBSTONE:
                record.tombs.add(seq)
                continue
            try:
                ticket_id, host, session, label, queued, server, origin = json.loads(found[seq])
            except (ValueError, TypeError):
                record.skip.add(seq)  # not ours, or damaged: nobody can be told
                continue
            if ("t", ticket_id) not in obs:
                obs[("t", ticket_id)] = record.old_obs.get(("t", ticket_id), now)
            state.queue[ticket_id] = Ticket(ticket_id, host, label, min(now, now - (record.wall - queued)), server,
                                            session, origin)
            record.seqs[ticket_id] = seq
            if seq in heads:
                record.head.add(ticket_id)
        if len(head) == unlisted:
            # Every unlisted place was read: the tombstones are known, and
            # nt is set right if one went missing (then it was skipped).
            if record.nt != len(record.tombs):
                self.log.warn("pool {pool}: {nt} left places counted, {tombs} found: counted again", pool=name,
                              nt=record.nt, tombs=len(record.tombs))
                record.nt = len(record.tombs)
                record.repaired = True
            record.hidden = 0
        else:
            # Places were left unread: any of them may be a waiter, so the
            # rules read further before they pass the head (even if the
            # count, which judges max_waiters, says none is).
            record.partial = True
            record.hidden = max(0, record.count - len(record.seqs) - len(record.skip))
        return True

    def _get_waiters(self, node: _Node, keys: Dict[int, str], seqs: List[int]) -> Dict[int, bytes]:
        found: Dict[int, bytes] = {}
        for i in range(0, len(seqs), READ_CHUNK):
            chunk = {keys[seq]: seq for seq in seqs[i:i + READ_CHUNK]}
            for k, value in self._call(node.client.get_many, list(chunk)).items():
                found[chunk[k]] = value
        return found

    def _write_waiters(self, node: _Node, record: _Record) -> None:
        """After the record's write: the keys of the waiters it queued (with
        ``add``: a place skipped meanwhile has a tombstone, and stays left),
        tombstones on the places it left, and the removal of the keys its
        head passed (best effort: they are never read again, and expire)."""
        epoch = record.epoch
        unwritten = []
        for _, seq, _, value in record.placed:
            key = self._q_key(epoch, seq)
            for _ in range(3):
                try:
                    if not self._call(node.client.add, key, value, noreply=False):
                        unwritten.append(key)  # skipped already
                    break
                except BackendUnavailable as e:
                    self.log.warn("writing waiter key {key}: {e}", key=key, e=e)
            else:
                unwritten.append(key)
        if unwritten:
            self.log.error("waiter keys {keys} not written: other servers skip their places after {grace:g} s, "
                           "and their waiters queue again", keys=unwritten, grace=MISSING_GRACE)
        try:
            if record.buried:
                self._call(node.client.set_many, {self._q_key(epoch, seq): TOMBSTONE for seq in record.buried},
                           noreply=True)
            start, end = record.passed
            for i in range(start, end, READ_CHUNK):
                self._call(node.client.delete_many, [self._q_key(epoch, seq)
                                                     for seq in range(i, min(end, i + READ_CHUNK))], noreply=True)
        except BackendUnavailable as e:
            self.log.warn("tidying waiter keys of {epoch}: {e}", epoch=epoch, e=e)

    def _transition(self, node: _Node, spec: PoolSpec, incarnation: str, settling: float, record: _Record,
                    lost: Optional[str], ops: List["_Op"], now: float, wall: float
                    ) -> Optional[Tuple[Optional[bytes], List[Step], Dict[str, Answer]]]:
        """Apply the operations, in order, to the record read: the bytes to
        write, if any, and their steps; None when the rules need more of the
        queue than was read.

        While the node settles, a pool that could grant waits (_NotYet); one
        in lock-delay past the settling answers at once (it grants nothing).
        """
        name = spec.name
        dirty = record.created
        blocked: List[Event] = []
        if lost is not None:
            blocked = self._block_record(record, spec, incarnation, now, wall)
            dirty = True
            self.log.critical(
                "memcached lost pool {pool} on {node}: {why}; granting nothing in it for {delay:g} s "
                "so that forgotten holders can finish", node=node.address, pool=name, why=lost,
                delay=_lock_delay(spec))
        state = record.state
        if settling and state.blocked_until < settling:
            raise _NotYet(settling - now)
        if record.block is not None and state.blocked_until <= now:
            # This server saw the lock-delay through: it ends for everyone.
            record.block = None
            state.blocked_until = 0.0
            state.last_token = max(state.last_token, self._floor(name, wall))
            dirty = True
        if record.incarnation != incarnation:
            record.incarnation = incarnation
            dirty = True
        if record.partial and not record.head:
            return None  # the head was all skipped: read further
        self._note_block(name, state.blocked_until)
        pool = Pool(partial_spec(spec, record.hidden), state, self.wall)
        pruned = self._prune(node, pool, now)
        steps = [self._requeue(pool, record, op, now) if op.requeue else op.fn(pool, now) for op in ops]
        steps[0].events[:0] = blocked + pruned
        events = [e for step in steps for e in step.events]
        if record.partial and not _head_enough(record, spec, events, now):
            return None
        for step in steps:
            if step.refused is not None:
                step.refused = queue_full(spec)
        # Delivered now, so renewed from now; one whose hold has lapsed
        # (this server was paused, or slow) comes back LAPSED: not delivered.
        answers = pool.take_answers(self.server_id, now)
        if self._moved(record, events, now, wall) or events or answers:
            dirty = True
        for op in ops:
            op.state, op.now = state, now
        return (self._dump(name, record, now, wall) if dirty else None), steps, answers

    def _requeue(self, pool: Pool, record: _Record, op: "_Op", now: float) -> Step:
        """Settle the pool, and queue again (at the back: the order was lost
        with the place) our waiters whose place the queue passed with no
        answer (see _passed), or which memcached lost with the record."""
        step = pool.tick(now)
        state = pool.state
        op.refused = []
        for ticket in op.requeue:
            placed = self._placed.get(ticket.id)
            if placed is not None and placed[1] == record.epoch and (
                    placed[2] < record.rs  # dropped by a reset: _passed answers NO
                    or record.lo <= placed[2] < record.seq and placed[2] not in record.left
                    and placed[2] not in record.skip):
                continue  # still in its place
            if ticket.id in state.queue or ticket.id in state.answers:
                continue  # in the head read, or answered (taken by this transaction)
            queued = pool.wait(ticket, now)
            step.events += queued.events
            if queued.refused is not None:
                op.refused.append(ticket.id)
        return step

    def _moved(self, record: _Record, events: List[Event], now: float, wall: float) -> bool:
        """Turn what the rules did to the queue into the record's counters:
        new waiters take the next places (their keys are written once the
        record is), places taken out are listed as left, and the head moves
        past every left place. True if the record changed."""
        state = record.state
        removed = {seq for ticket_id, seq in record.seqs.items() if ticket_id not in state.queue} | record.skip
        new = [t for ticket_id, t in state.queue.items() if ticket_id not in record.seqs]
        # Every waiter dropped by an operator's reset (a full read): their
        # servers learn it from ``rs``, not from one answer each.
        dropped = any(e.kind == RESET and e.token is None for e in events)
        if dropped:
            record.rs = record.seq
            for ticket_id in [t for t, a in state.answers.items() if a.kind == RESET]:
                del state.answers[ticket_id]
        for ticket in new:
            record.placed.append((ticket.id, record.seq, ticket, _json(
                [ticket.id, ticket.host, ticket.session, ticket.label, wall - (now - ticket.queued_at), ticket.server,
                 ticket.origin])))
            record.fresh[("t", ticket.id)] = now
            record.seq += 1
        # Listed places found with a tombstone are only counted from now;
        # the head moves past left places, listed or tombstoned.
        left = (record.left - record.compact) | removed
        record.nt += len(record.compact)
        lo = start = record.lo
        while lo in left or lo in record.tombs:
            if lo in left:
                left.discard(lo)
            else:
                record.nt -= 1
            lo += 1
        record.lo, record.left, record.passed = lo, left, (start, lo)
        record.buried = sorted({seq for seq in removed if seq >= lo} | {seq for seq in record.unmarked if seq >= lo})
        return bool(removed or new or dropped or record.compact or record.unmarked or record.repaired or lo != start)

    def _block_record(self, record: _Record, spec: PoolSpec, incarnation: str, now: float,
                      wall: float) -> List[Event]:
        block = (uuid.uuid4().hex[:16], _lock_delay(spec))
        record.fresh[("b", block[0])] = now
        record.block = block
        record.loss = incarnation
        record.incarnation = incarnation
        record.state.last_token = max(record.state.last_token, self._floor(spec.name, wall))
        return Pool(spec, record.state, self.wall).block(now, now + block[1]).events

    def _note_block(self, name: str, until: float) -> None:
        """Remember the pool's lock-delay, for lock_delays()."""
        if until:
            self._blocked[name] = until
        else:
            self._blocked.pop(name, None)

    def _check_unchanged(self, node: _Node, incarnation: str) -> None:
        """After an ``add``: the node kept its marker, so it did not restart
        between our read and our write (an ``add`` lands on an empty node)."""
        marker = _read_marker(self._call(node.client.get, self._marker_key))
        if marker is None or marker[0] != incarnation:
            # The record we wrote names the old marker: the next reader
            # blocks the pool. Our step is not answered.
            raise BackendUnavailable(f"memcached {node.address} lost its data during the request")

    def _noted(self, node: _Node, name: str, incarnation: str, record: _Record) -> None:
        state = record.state
        with node.lock:
            if node.incarnation == incarnation:
                node.seen.add(name)
        self._saw_token(name, state.last_token)
        self._heads[name] = (record.epoch, record.lo, record.seq, frozenset(record.left))
        gone = self._missing.get(name)
        if gone is not None:
            if gone[0] != record.epoch:
                del self._missing[name]
            else:
                for seq in [seq for seq in gone[1] if seq < record.lo or seq in record.left]:
                    del gone[1][seq]
                if not gone[1]:
                    del self._missing[name]
        if state.holders or record.count:
            self._busy.add(name)
        else:
            self._busy.discard(name)

    def _saw_token(self, name: str, token: int) -> None:
        if token > self._last_token.get(name, 0):
            self._last_token[name] = token

    def _floor(self, name: str, wall: float) -> int:
        """The last token of a record created or unblocked now: above any
        token granted before, by any server within the clock bound."""
        return max(self._last_token.get(name, 0), int((wall + TOKEN_FLOOR_MARGIN) * TOKEN_RESOLUTION))

    # -- the record ----------------------------------------------------------------

    def _load(self, name: str, raw: bytes, now: float, wall: float) -> _Record:
        """Decode a record, translating its times into this server's clock:
        each lease version, block, ticket and answer counts from when this
        server first saw it."""
        old = self._obs.get(name, {})
        obs: Dict[tuple, float] = {}

        def first_seen(key: tuple) -> float:
            at = old.get(key, now)
            obs[key] = at
            return at

        data: Any = None
        try:
            data = json.loads(raw)
            if data.get("v") != RECORD_VERSION:
                raise ValueError("record version")
            record = self._decode(name, data, now, wall, first_seen)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            # Another format (an older distributex), or damaged: what it
            # held is unknown here, so it counts as lost; its token is kept.
            token = data.get("tok", data.get("t")) if isinstance(data, dict) else None
            record = _Record(PoolState(last_token=token if isinstance(token, int) else 0), None, None, None, {},
                             _epoch())
            obs.clear()
        record.old_obs = old
        self._obs[name] = obs  # only what the record holds: the table stays bounded
        self._saw_token(name, record.state.last_token)
        return record

    def _decode(self, name: str, data: Dict[str, Any], now: float, wall: float,
                first_seen: Callable[[tuple], float]) -> _Record:
        state = PoolState(last_token=int(data["tok"]))
        walls: Dict[tuple, float] = {}
        for host, session, label, token, renewals, granted, lease, ticket, server, origin in data["h"]:
            start = first_seen(("h", host, session, token, renewals))
            walls[("h", host, session, token)] = granted
            state.holders[(host, session)] = Hold(
                host, label, token, min(now, now - (wall - granted)), None if lease is None else start + lease,
                ticket, server, session, renewals, origin)
        for ticket_id, (kind, token, server) in data["a"].items():
            first_seen(("a", ticket_id))
            state.answers[ticket_id] = Answer(kind, token, server)
            if token is not None:
                self._saw_token(name, token)
        block = data["b"]
        if block is not None:
            block = (str(block[0]), float(block[1]))
            state.blocked_until = first_seen(("b", block[0])) + block[1]
        return _Record(state, data["n"], data["L"], block, walls, str(data["e"]), int(data["lo"]), int(data["seq"]),
                       {int(seq) for seq in data["x"]}, int(data["nt"]), int(data["rs"]))

    def _dump(self, name: str, record: _Record, now: float, wall: float) -> bytes:
        obs = self._obs.get(name, {})
        fresh = record.fresh
        walls = record.walls
        state = record.state
        holds = []
        for h in state.holders.values():
            # A version this server has not seen before is new: it starts now
            # (and counts as seen once the write lands).
            key = ("h", h.host, h.session, h.token, h.renewals)
            start = obs[key] if key in obs else fresh.setdefault(key, now)
            granted = walls.get(("h", h.host, h.session, h.token), wall - (now - h.granted_at))
            holds.append([h.host, h.session, h.label, h.token, h.renewals, granted,
                          None if h.expires_at is None else h.expires_at - start, h.ticket, h.server, h.origin])
        for ticket_id in state.answers:
            if ("a", ticket_id) not in obs:
                fresh[("a", ticket_id)] = now
        return _json({
            "v": RECORD_VERSION,
            "n": record.incarnation,
            "L": record.loss,
            "tok": state.last_token,
            "b": None if record.block is None else list(record.block),
            "h": holds,
            "a": {tid: [a.kind, a.token, a.server] for tid, a in state.answers.items()},
            "e": record.epoch,
            "lo": record.lo,
            "seq": record.seq,
            "x": sorted(record.left),
            "nt": record.nt,
            "rs": record.rs,
        })

    # -- the node: its marker, its losses, its clock ----------------------------

    def _sync(self, node: _Node, version: int, marker: Optional[Marker], has_record: bool, now: float,
              create: bool = True) -> Tuple[Optional[str], float]:
        """Check the node's marker against what this server remembers.

        Returns the node's incarnation when the pool may be used, and until
        when the node settles (0 when it does not): nothing on it may be
        granted before. The incarnation is None when the marker was dealt
        with (a loss blocked, a marker created) and the caller must read
        again (also when ``version``, the node's when the marker was read, is
        out of date: another thread has dealt with the node since).
        """
        with node.lock:
            if node.version != version:
                return None, 0.0
            known = node.incarnation
            if marker is None:
                if known is not None or has_record:
                    self._lost(node, None, now)
                elif create:
                    self._create_marker(node)
                return None, 0.0
            incarnation, state, settle = marker
            if incarnation != known:
                if known is not None:
                    self._lost(node, marker, now)
                    return None, 0.0
                self._adopt(node, incarnation)
            if state == SETTLING:
                until = node.settling.setdefault(incarnation, now) + settle
                if now < until:
                    return incarnation, until
                self._settled(node, incarnation)
            return incarnation, 0.0

    def _adopt(self, node: _Node, incarnation: str) -> None:
        node.version += 1
        node.incarnation = incarnation
        node.seen = set()
        node.settling = {k: v for k, v in node.settling.items() if k == incarnation}

    def _lost(self, node: _Node, marker: Optional[Marker], now: float) -> None:
        """The node lost its data: block every pool this server knows there,
        then (if it has none) give the node a new, settling marker."""
        incarnation = marker[0] if marker is not None else uuid.uuid4().hex
        names = self._pools_on(node)
        for name in names:
            self._block(node, name, incarnation, now)
        if marker is None and not self._call(node.client.add, self._marker_key,
                                             _marker(incarnation, SETTLING), noreply=False):
            # Another server gave it a marker first: the next read deals with
            # that one (the blocks just written name ours, so count as lost).
            return
        self.log.critical(
            "memcached lost its data (restarted, flushed or evicted) on {node}: pools {pools} grant "
            "nothing for one lease (lock-delay) so that holders it forgot can finish",
            node=node.address, pools=", ".join(names) or "(none known here)")
        self._adopt(node, incarnation)

    def _block(self, node: _Node, name: str, incarnation: str, now: float) -> None:
        """Write the pool's lock-delay for this loss, unless it has it already.
        Its writer counts it from now (the loss happened before)."""
        spec = self._spec(name)
        if spec is None:
            return
        key = self._pool_key(name)
        for _ in range(MAX_CAS_ATTEMPTS):
            raw, cas = self._call(node.client.gets, key)
            wall = self.wall()
            floor = self._floor(name, wall)
            block = [uuid.uuid4().hex[:16], _lock_delay(spec)]
            data: Dict[str, Any]
            if raw is None:
                data = dict(_empty_record(), n=incarnation, L=incarnation, tok=floor, b=block)
                if self._call(node.client.add, key, _json(data), noreply=False):
                    self._blocked_by_loss(name, block, now)
                    return
                continue
            try:
                data = json.loads(raw)
                if data.get("v") != RECORD_VERSION:
                    raise ValueError("record version")
            except (ValueError, AttributeError):
                data = _empty_record()
            self._saw_token(name, data["tok"])
            if data["L"] == incarnation:
                # Blocked for this loss already; the tokens this server saw
                # still count.
                if data["tok"] >= floor or self._call(node.client.cas, key, _json(dict(data, tok=floor)), cas,
                                                      noreply=False):
                    return
                continue
            data.update(n=incarnation, L=incarnation, b=block, tok=max(data["tok"], floor))
            if self._call(node.client.cas, key, _json(data), cas, noreply=False):
                self._blocked_by_loss(name, block, now)
                return
        raise BackendUnavailable(f"pool {name!r}: too much contention while blocking it")

    def _blocked_by_loss(self, name: str, block: List[Any], now: float) -> None:
        self._obs.setdefault(name, {})[("b", block[0])] = now
        self._blocked[name] = now + block[1]
        with self._pending_lock:
            self._pending_events.append(Event(BLOCKED, name, "", "", None, None, now))

    def _create_marker(self, node: _Node) -> None:
        """A node with no marker that nobody here remembers: in use at once
        if its stats show it can have lost nothing, else settling."""
        stats = self._stats(node)
        fresh = (stats.get(b"uptime", 0) >= MARKER_SETTLE and not stats.get(b"cmd_flush", 0)
                 and not stats.get(b"evictions", 0))
        self._call(node.client.add, self._marker_key,
                   _marker(uuid.uuid4().hex, IN_USE if fresh else SETTLING), noreply=False)

    def _settled(self, node: _Node, incarnation: str) -> None:
        raw, cas = self._call(node.client.gets, self._marker_key)
        marker = _read_marker(raw)
        if marker is not None and marker[0] == incarnation and marker[1] == SETTLING:
            self._call(node.client.cas, self._marker_key, _marker(incarnation, IN_USE), cas, noreply=False)

    def _stats(self, node: _Node) -> Dict[bytes, Any]:
        stats: Dict[bytes, Any] = self._call(node.client.stats)
        return stats

    def _measure(self, node: _Node) -> None:
        """One sample of the offset between memcached's clock and ours."""
        started = self.mono()
        before = self.wall()
        stats = self._stats(node)
        after = self.wall()
        at = float(stats[b"time"])
        sample = (at - after, at + MEMCACHED_TIME_LAG - before)
        with node.lock:
            if started < node.sample_started:
                # Another thread's later sample got here first (a transaction
                # and the heartbeat measuring at once): after a clock step this
                # one would clear that sample's verdict with a stale one.
                return
            node.sample_started = started
            node.samples.append(sample)
            low = max(s[0] for s in node.samples)
            high = min(s[1] for s in node.samples)
            if low > high:  # a clock was stepped: start again
                node.samples.clear()
                node.samples.append(sample)
                low, high = sample
            was_skewed, skewed = node.skewed, max(abs(low), abs(high)) > MAX_CLOCK_SKEW
            node.offset = (low, high)
            node.skewed = skewed
            # Last: _check_clock reads it without the lock, from the worker
            # threads, and skips measuring once it is set; the verdict must
            # be there by then.
            node.measured_at = self.mono()
        if skewed and not was_skewed:
            self.log.critical(
                "this server's clock is {low:+.1f} to {high:+.1f} s off memcached {node}'s, more than "
                "{bound:g} s: its pools answer ERROR until the clocks agree again (run NTP)",
                low=-high, high=-low, node=node.address, bound=MAX_CLOCK_SKEW)
        elif was_skewed and not skewed:
            self.log.info("this server's clock agrees with memcached {node}'s again", node=node.address)

    def _check_clock(self, node: _Node) -> None:
        if node.measured_at is None or self.mono() - node.measured_at > CLOCK_RECHECK:
            self._measure(node)
        if node.skewed:
            raise BackendUnavailable(
                f"this server's clock is more than {MAX_CLOCK_SKEW:g} s off memcached {node.address}'s")

    # -- presence ------------------------------------------------------------------

    def _prune(self, node: _Node, pool: Pool, now: float) -> List[Event]:
        """Drop the queued tickets and undelivered answers of servers that
        have died; a grant nobody was told of is given back."""
        state = pool.state
        others = {t.server for t in state.queue.values()} | {a.server for a in state.answers.values()}
        others.discard(self.server_id)
        others.discard(None)
        if not others:
            return []
        dead = self._dead(node, others, now)  # type: ignore[arg-type]
        if not dead:
            return []
        # A ticket seen for less than the presence TTL may belong to a server
        # that has not written its presence yet; one queued longer ago than
        # that by the clocks (within MAX_CLOCK_SKEW of memcached's) may not:
        # a dead server's waiters reach the head of the queue long after
        # they queued, and are dropped at once.
        obs = self._obs.get(pool.spec.name, {})
        old = now - PRESENCE_TTL
        long_ago = old - 2 * MAX_CLOCK_SKEW
        events = pool.prune(lambda t: t.server in dead and (obs.get(("t", t.id), now) <= old
                                                            or t.queued_at <= long_ago), now).events
        for ticket_id, answer in list(state.answers.items()):
            if answer.server in dead and obs.get(("a", ticket_id), now) <= old:
                events += pool.leave(ticket_id, now).events
        return events

    def _dead(self, node: _Node, servers: Set[str], now: float) -> Set[str]:
        stale = [s for s in servers if (node.address, s) not in self._presence
                 or self._presence[(node.address, s)][1] < now - PRESENCE_REFRESH]
        if stale:
            found = self._call(node.client.get_many, [self._server_key(s) for s in stale])
            for s in stale:
                self._presence[(node.address, s)] = (self._server_key(s) in found, now)
        return {s for s in servers if not self._presence[(node.address, s)][0]}

    def _clear_presence(self) -> None:
        for node in self.nodes.values():
            try:
                self._call(node.client.delete, self._server_key(self.server_id), noreply=False)
            except BackendUnavailable as e:
                self.log.warn("could not clear this server's presence on {node}: {e}", node=node.address, e=e)

    # -- background work ----------------------------------------------------------

    def _beat(self) -> Deferred:
        d = self._in_thread(self._beat_now)
        d.addErrback(lambda f: self.log.error("memcached heartbeat failed: {f.value}", f=f))
        d.addCallback(lambda _: self._flush_events())
        d.addCallback(lambda _: self._forget_pools())
        return d

    def _beat_now(self) -> None:
        """Every node: this server's presence, the clock offset, the marker."""
        for node in self.nodes.values():
            try:
                self._call(node.client.set, self._server_key(self.server_id), b"1",
                           expire=PRESENCE_TTL, noreply=False)
                self._measure(node)
                version = node.version
                marker = _read_marker(self._call(node.client.get, self._marker_key))
                self._sync(node, version, marker, False, self.mono(), create=False)
            except BackendUnavailable as e:
                self.log.error("memcached {node} heartbeat failed: {e}", node=node.address, e=e)
        now = self.mono()
        forget = now - 60 * PRESENCE_TTL
        for key in [k for k, (_, at) in self._presence.items() if at < forget]:
            self._presence.pop(key, None)

    def _forget_pools(self) -> None:
        """Forget pools made on demand that this server has not used for two
        lock-delays (the holds it saw there have ended; servers that renew
        them remember them): what it keeps stays bounded by the pools in use.
        On the reactor thread, like the locks."""
        now = self.mono()
        for name, used in list(self._used.items()):
            if name in self.pools:
                continue
            spec = self._spec(name)
            if spec is not None and now - used < 2 * _lock_delay(spec):
                continue
            if name in self._running:
                continue
            for table in (self._used, self._obs, self._last_token, self._node_of, self._blocked,
                          self._heads, self._missing):
                table.pop(name, None)
            self._busy.discard(name)

    def _poll(self) -> None:
        """Re-read the pools where our waiters have places (grants by other
        servers, expiries, dead servers' tickets, lost places), or where a
        leave is owed: one transaction per pool, whatever the number of
        waiters."""
        skewed = {name for name in set(self._mine) | set(self._lost_local) if self._node(name).skewed}
        if skewed:
            for ticket_id, local in list(self._tickets.items()):
                if local.pool in skewed:
                    # This server's clock is off: its waiters get ERROR now
                    # rather than a grant it cannot make safely.
                    waiter = self._close(ticket_id, LEFT)
                    if waiter is not None:
                        self._orphans[ticket_id] = local.pool
                        waiter.errback(BackendUnavailable("this server's clock is off memcached's"))
        owing = {pool for pool in self._orphans.values() if not self._node(pool).skewed}
        for name in (set(self._mine) | set(self._lost_local) | owing) - skewed - self._polling:
            self._polling.add(name)
            owed = [t for t, pool in self._orphans.items() if pool == name]
            if owed:
                d = self._leave(name, owed)
            else:
                lost = self._lost_local.pop(name, set())
                # In the order of their places (``mine`` is): FIFO among them.
                op = _Op(_tick, requeue=[t for tid, t in self._mine.get(name, {}).items() if tid in lost]
                         if lost else ())
                d = self._run(name, op).addCallback(self._refused, name, op)
            d.addErrback(self._poll_failed, name)
            d.addBoth(self._polled, name)

    def _refused(self, _: object, name: str, op: "_Op") -> None:
        """Waiters that lost their place and found the queue full: QueueFull."""
        spec = self._spec(name)
        for ticket_id in op.refused:
            waiter = self._close(ticket_id, LEFT)
            if waiter is not None:
                self._placed.pop(ticket_id, None)  # it has no place to leave
                waiter.errback(QueueFull(queue_full(spec) if spec is not None else "the queue is full"))

    def _poll_failed(self, failure: Failure, name: str) -> None:
        self.log.error("polling pool {pool}: {f.value}", pool=name, f=failure)

    def _polled(self, _: object, name: str) -> None:
        self._polling.discard(name)


def _lock_delay(spec: PoolSpec) -> float:
    return max(spec.expire or DEFAULT_EXPIRE, LOCK_DELAY_MIN)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _epoch() -> str:
    return uuid.uuid4().hex[:16]


def _empty_record() -> Dict[str, Any]:
    return {"v": RECORD_VERSION, "n": None, "L": None, "tok": 0, "b": None, "h": [], "a": {}, "e": _epoch(),
            "lo": 0, "seq": 0, "x": [], "nt": 0, "rs": 0}


def _tick(pool: Pool, now: float) -> Step:
    return pool.tick(now)


def _answer_batch(result: Result, batch: List[Tuple["_Op", Deferred]]) -> None:
    for (_, d), step in zip(batch, result.steps):
        d.callback(step)


def _fail_batch(failure: Failure, batch: List[Tuple["_Op", Deferred]]) -> None:
    for _, d in batch:
        d.errback(failure)


def _head(lo: int, end: int, left: AbstractSet[int], limit: int) -> List[int]:
    """The first ``limit`` places in [lo, end) that are not left."""
    if not left:
        return list(range(lo, min(end, lo + limit)))
    head: List[int] = []
    seq = lo
    while seq < end and len(head) < limit:
        if seq not in left:
            head.append(seq)
        seq += 1
    return head


def _head_enough(record: _Record, spec: PoolSpec, events: List[Event], now: float) -> bool:
    """Whether the rules, which saw only the head of the queue, did what
    they would have done seeing all of it: they grant in queue order, so
    only once the head is used up can a slot be left for a waiter not read,
    or go to someone behind them (a /get, a new waiter, one read out of
    order)."""
    state = record.state
    if any(ticket_id in state.queue for ticket_id in record.head):
        return True
    if len(state.holders) < spec.maxlocks and now >= state.blocked_until:
        return False
    queued = set()
    for e in events:
        if e.kind == QUEUED:
            queued.add(e.ticket)
        elif e.kind == GRANTED and e.ticket not in record.head:
            return False
        # A renewal of a place (not of a holder asking again, which renews
        # at once) that is not in the head: it passed the waiters not read.
        elif (e.kind == RENEWED and e.ticket not in record.head
              and (e.ticket in record.seqs or e.ticket in queued)):
            return False
    return True
