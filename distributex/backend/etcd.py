"""Pool states kept in etcd v3, shared by several distributex servers.

etcd replicates with Raft: a cluster of 3 (or 5) members keeps serving
through the loss of any 1 (or 2), leader elections included, with nothing
acknowledged ever lost. Every change to a pool is one etcd transaction
conditioned on what was read, so the guarantees of the contract hold across
servers exactly as on one: this module loads the part of a pool it needs
into a PoolState, applies the same rules as every backend
(distributex.pool), and writes the difference.

Talking to etcd: its v3 JSON gateway (``/v3/kv/txn``, ``/v3/lease/*``,
``/v3/watch``) over treq's Agent, so nothing blocks the reactor
(distributex.backend.etcd_client says why not gRPC). Several endpoints,
failover between them, TLS and etcd authentication are options.

Key layout (``NS`` is the ``namespace``)::

    NS/pool/NAME                       the pool: last token, queue counters, holders, lock-delay
    NS/q/NAME/SEQ/TICKET               one key per waiter, SEQ 16 hex digits: key order is queue order
    NS/a/NAME/TICKET                   the outcome of a queued ticket granted by another server
    NS/server/ID                       each server's presence (for checking its own watch)

The pool key holds ``tok`` (last token), ``seq`` (the next waiter's SEQ),
``lo`` (no waiter key below it), ``n`` (waiters, counted by transactions),
``h`` (the holders: at most maxlocks of them), ``b`` (a lock-delay),
``ids`` (the last transactions that wrote it) and ``op``/``rs`` (a reset).
Waiter and answer keys are bound to their server's etcd lease.

Transactions. An operation reads, in one read-only txn, the pool key, the
answers, and the head of the queue: the waiter keys in [lo, lo + 256),
at most maxlocks + 4 of them (etcd 3.4 walks its index over the range it is
given, so the window, not the queue, bounds the cost). It applies the rule
to that partial PoolState (the rules only look at the head of the queue;
``max_waiters`` is judged on the count) and writes, in one txn: the pool
key, the waiter keys promoted or left (deleted), the new ones (put), the
answers owed to other servers (put, bound to the owner's lease), all
conditioned on the pool key's mod_revision and on every waiter key read
still being there (a waiter may vanish with a dead server's lease without
touching the pool key). A conflict starts again from the fresh state that
the failed txn's other branch read in the same round trip. Operations on
one pool queued on one server run as one batch in one txn (10,000 /wait
arrive in a few hundred txns, not 10,000). A write whose fate is unknown
(a timeout, a connection lost, a leader lost) is checked: the pool key
lists the ids of the last transactions that wrote it, so a retry never
applies an operation twice.

One round trip per operation: each server remembers the last view it read
of a pool (a write's txn reads the pool back after its writes, in the same
round trip), and the watch keeps that view current. An operation is then
applied to the remembered view and sent as one txn whose compares check the
view is still the truth; when it is not, the txn's other branch brings the
fresh state back and the operation is applied again. An operation that
writes nothing (a /get answered NO) still sends its compares, so every
answer is linearizable.

Cost: independent of the queue's length (a waiter is one key; an operation
reads a bounded window of them) and proportional to maxlocks (holders are
in the pool key). A whole-pool reset and ``/status/`` read the whole queue:
their answer is that long anyway.

Push, not poll: every server keeps one watch on ``NS/`` (a chunked HTTP
answer of JSON lines) and reacts to what it sees: an answer key for one of
its waiters (it takes the answer in a txn and says YES), a pool key changed
(it times the holders' leases, below), a waiter or answer key deleted
without a pool transaction (a server's lease ended: the servers with
waiters in that pool settle it at once). A server checks its own watch by
writing its presence key every two seconds and expecting to see it come
back; a watch that stays silent is started again on the next endpoint, from
the last revision seen, so no event is lost (after a compaction, the pools
with local waiters are re-read).

Leases of holds (guarantee 3) are timed by observation, as by the memcache
backend, because etcd's own leases have whole-second TTLs, a floor of about
1.5 election timeouts and are refreshed by every new leader: a hold carries
its length, and each server times each version of it (token, renewals) from
the moment it first saw it, on its own monotonic clock (CLOCK_BOOTTIME),
through the watch or a read, both after the commit. So no server ends a
hold before ``expire`` after its grant or renewal, whatever the servers'
wall clocks say; the first whose count runs out ends it for all, and the
servers with waiters in the pool keep a timer for it. A server that first
sees a hold late (it started after the grant) counts a whole lease from
then; that delays the end only when no server that saw the grant is left.
A grant made for another server's waiter is renewed when that server takes
it (the client counts its lease from its YES); one whose hold ended before
anyone took it goes back to the queue.

Server liveness: each server holds one etcd lease (TTL 3 s, kept alive
every second) for its waiter and answer keys, so etcd itself drops the
places of a server that died within about 3 s; the other servers see the
keys go and hand the slot on. A grant made for a dead server's waiter (its
answer key vanished with the lease while the hold still says "pending") is
given back by the next transaction on the pool, unless the holder has
renewed it meanwhile (its client asked again through another server and
was told YES): a renewal clears "pending". Holds are not bound to any
server's lease: they live ``expire`` seconds, as the contract says, whoever
granted them. A server whose own lease ended (it was cut off from etcd for
longer than the TTL) takes a new one and queues its open /wait again.

Fencing tokens (guarantee 4): the pool key's last token, advanced by the
pool rules as next_token(last, wall clock in µs) (distributex.token), in
the same txn as the grant, conditioned on the pool key: strictly increasing
and never reused, across servers, restarts and leader elections. etcd's
revisions are not used as tokens: they are small numbers that start at 1,
below the microsecond tokens that the other backends gave, so a pool moved
to etcd would go backwards. A pool key created afresh (a new pool, a pool
moved from another backend, a namespace wiped) starts at the wall clock in
µs plus TOKEN_FLOOR_MARGIN (10 s): above every token granted before
provided the servers' clocks agree within 10 s.

Durability (guarantee 6): etcd keeps everything acknowledged on a quorum
of disks. A pool key that vanishes while this server knew it had holders
(the namespace deleted, etcd restored from an old backup) starts a
lock-delay: nothing is granted for one lease.

Failure behaviour:

- an etcd member (leader or follower) dies: requests to it fail over to the
  next endpoint; a leader election (about a second) holds writes, which are
  retried within OP_DEADLINE; nothing is granted twice, nothing is lost;
- etcd loses quorum or cannot be reached: every request answers ERROR
  (503) after OP_DEADLINE; open /wait stay open; holds keep their length
  (timed by each server) and renewals fail, so clients stop their commands
  after a lease, as the contract says;
- a distributex server dies: its holders keep their leases; its waiters
  leave the queue when its etcd lease ends (about 3 s); grants owed to it
  are given back;
- a distributex server is paused (SIGSTOP) for longer than 3 s: the same,
  and when it wakes its waiters queue again at the back.

What etcd needs: ``--auto-compaction-retention`` (every lock operation is
a new revision, which etcd keeps until compacted; a watch that falls behind
a compaction is handled), and ``--max-txn-ops`` (default 128) above about
2 x maxlocks + 16 for a large semaphore (a change that needs more answers
ERROR and says so). With etcd authentication, the user's role needs
readwrite on the prefix ``NS/``.

Not done: the keys of pools made on demand stay in etcd once used (about
100 bytes each; the in-memory backend forgets idle ones); tokens of a pool
key created afresh rely on the servers' clocks agreeing within 10 s.

Every in-process deadline is on the monotonic clock; the wall clock is used
only for tokens and the times /status/ shows.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from distributex.backend.base import (
    ANSWERED,
    LEFT,
    QUEUED,
    REGISTERED,
    Backend,
    BackendUnavailable,
    LocalTicket,
    Operation,
    QueueFull,
    _leave_all,
    partial_spec,
)
from distributex.backend.etcd_client import (
    KV,
    Ambiguous,
    EtcdClient,
    NotSent,
    _is_final,
    delete_op,
    mod_is,
    prefix_end,
    put_op,
    range_kvs,
    range_op,
    unb64,
)
from distributex.backend.memory import monotonic_clock
from distributex.catalog import Catalog
from distributex.config import DEFAULT_EXPIRE, Config, PoolSpec
from distributex.pool import (
    GRANTED,
    RENEWED,
    RESET,
    Answer,
    Event,
    Hold,
    Pool,
    PoolState,
    Step,
    Ticket,
    queue_full,
)
from distributex.token import TOKEN_RESOLUTION

#: The TTL of each server's etcd lease: its waiters leave this long after it died.
SERVER_TTL = 3
#: Keep-alives of that lease.
KEEPALIVE_INTERVAL = 1.0
#: How often a server writes its presence key and checks its watch saw the last one.
WATCH_CHECK_INTERVAL = 2.0
#: Pools with local waiters are settled this often even with no event (a safety net).
BACKSTOP_INTERVAL = 10.0
#: A pool whose settling failed (etcd without a leader, endpoints down) and
#: that still has local waiters is settled again this soon: an answer may be
#: owed to them, and the watch event that told of it will not come again.
RESETTLE_DELAY = 0.5
#: The waiter keys an operation reads: maxlocks + HEAD_EXTRA ...
HEAD_EXTRA = 4
#: ... within this window of SEQ numbers from ``lo``, widened when it holds too few.
WINDOW = 256
#: Operations of one pool applied in one txn.
BATCH = 32
#: etcd's default --max-txn-ops.
MAX_TXN_OPS = 128
#: Conflicts before an operation gives up with ERROR.
MAX_CONFLICTS = 40
#: How long an operation keeps trying through failovers and elections (an
#: election takes about a second with etcd's default timing) before ERROR.
OP_DEADLINE = 5.0
#: A pool key created afresh starts its tokens this far past the wall clock.
TOKEN_FLOOR_MARGIN = 10.0
#: The shortest lock-delay after a pool key was lost.
LOCK_DELAY_MIN = 2 * TOKEN_FLOOR_MARGIN + 1.0
#: Transaction ids kept in the pool key, to settle a write of unknown fate.
RECENT_IDS = 16
#: The pool key's format.
VERSION = 1
#: A grant to one of this server's own waiters whose transaction came back
#: later than this share of the lease after it was planned (the server was
#: paused, or etcd slow through an election) is not delivered as it is: the
#: other servers count the lease from the commit, the client would count it
#: from its YES. It is confirmed first, renewed in a transaction of its own,
#: or queued again if its hold has ended meanwhile.
LATE_GRANT_SHARE = 0.1


class _Op:
    """One operation waiting for its pool's next transaction."""

    __slots__ = ("fn", "d", "need", "full", "poke")

    def __init__(self, fn: Operation, need: Iterable[str] = (), full: bool = False, poke: bool = False) -> None:
        self.fn = fn
        self.d: Deferred[Step] = Deferred()
        self.need = list(need)  # local tickets whose waiter keys it must see
        self.full = full  # reads the whole queue (a reset, /status/)
        self.poke = poke  # a settle asked for by an event or a timer


class _View:
    """What one read of a pool returned."""

    __slots__ = ("pool", "meta", "head", "extra", "answers", "wlo", "whi", "limit", "window_count",
                 "exact", "total", "revision", "mark")

    def __init__(self) -> None:
        self.pool: Optional[KV] = None
        self.meta: Dict[str, Any] = {}
        self.head: List[KV] = []
        self.extra: List[KV] = []
        self.answers: List[KV] = []
        self.wlo = 0
        self.whi = 0
        self.limit = 0
        self.window_count = 0
        self.exact = False
        self.total = 0
        self.revision = 0
        # This server's count of pool sightings when the read was sent: a
        # read sent before a sighting may not include what was seen.
        self.mark = 0


class _Result:
    __slots__ = ("steps", "extra", "state", "taken", "now", "revision")

    def __init__(self, steps: List[Step], extra: List[Step], state: PoolState,
                 taken: List[Tuple[str, str, int]], now: float, revision: int) -> None:
        self.steps = steps
        self.extra = extra  # steps no operation asked for: orphans given back, lapsed grants queued again
        self.state = state
        self.taken = taken  # (ticket, kind, token) owed to this server's waiters, to deliver
        self.now = now
        self.revision = revision


#: One key a txn writes: (key, value, lease), the value None when it deletes the key.
Change = Tuple[bytes, Optional[bytes], int]


class _Plan:
    """A batch applied: the result, and the txn that makes it so."""

    __slots__ = ("result", "compares", "writes", "txn_id", "obs", "value", "new_seqs", "changes")

    def __init__(self, result: "_Result", compares: List[Dict], writes: List[Dict], txn_id: str,
                 obs: Dict[tuple, float], value: Optional[Dict[str, Any]], new_seqs: Dict[str, int],
                 changes: Optional[List[Change]] = None) -> None:
        self.result = result
        self.compares = compares
        self.writes = writes
        self.txn_id = txn_id
        self.obs = obs
        self.value = value
        self.new_seqs = new_seqs
        # The writes key by key, when the view after them can be built
        # without reading it back (see EtcdBackend._view_after); else None.
        self.changes = changes


class _NeedLease(Exception):
    """A waiter key is to be written and this server has no lease yet."""


class _Retry(Exception):
    """Read again with these window parameters."""

    def __init__(self, wlo: int, whi: int, limit: int, exact: bool = False) -> None:
        super().__init__()
        self.wlo, self.whi, self.limit, self.exact = wlo, whi, limit, exact


def _seq_of(key: bytes) -> Tuple[int, str]:
    """(SEQ, TICKET) of a waiter key NS/q/NAME/SEQ/TICKET."""
    parts = key.rsplit(b"/", 2)
    return int(parts[1], 16), parts[2].decode()


def _lock_delay(spec: PoolSpec) -> float:
    return max(spec.expire or DEFAULT_EXPIRE, LOCK_DELAY_MIN)


def _tick(pool: Pool, now: float) -> Step:
    return pool.tick(now)


class EtcdBackend(Backend):
    shared = True

    def __init__(self, config: Config, reactor: IReactorTime, client: Optional[EtcdClient] = None,
                 mono: Optional[Callable[[], float]] = None, wall: Optional[Callable[[], float]] = None) -> None:
        super().__init__(config.pools, reactor)
        self.namespace = config.namespace
        self.mono = mono if mono is not None else monotonic_clock()
        self.wall = wall if wall is not None else time.time
        if client is None:
            password = None
            if config.etcd_password_file is not None:
                with open(config.etcd_password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            client = EtcdClient(config.etcd_endpoints, reactor, cacert=config.etcd_cacert,
                                cert=config.etcd_cert, key=config.etcd_key, user=config.etcd_user,
                                password=password)
        self.client = client
        ns = self.namespace.encode()
        self._prefix = ns + b"/"
        self._pool_prefix = ns + b"/pool/"
        self._q_prefix = ns + b"/q/"
        self._a_prefix = ns + b"/a/"
        self._server_prefix = ns + b"/server/"
        self.lease: Optional[int] = None
        self._lease_pending: Optional[Deferred] = None
        self._pending: Dict[str, List[_Op]] = {}
        self._running: Set[str] = set()
        self._poked: Set[str] = set()
        self._txn_ids = 0
        # When this server first saw each version of each pool's holds
        # (and each lock-delay), on its monotonic clock.
        self._obs: Dict[str, Dict[tuple, float]] = {}
        self._holds: Dict[str, List[Tuple[tuple, Optional[float]]]] = {}  # pool -> [(version, lease)]
        self._block_seen: Dict[str, Tuple[str, float]] = {}  # pool -> (block id, seconds)
        self._blocked: Dict[str, float] = {}  # pool -> end of its lock-delay (mono)
        self._lo: Dict[str, int] = {}  # pool -> the last ``lo`` seen
        self._last_token: Dict[str, int] = {}
        # Pools last seen with holders -> the sighting (a count of them) it was.
        self._had_holders: Dict[str, int] = {}
        self._sightings = 0
        self._busy: Set[str] = set()  # pools last seen with holders or waiters
        self._specs: Dict[str, PoolSpec] = {}  # the spec each used pool last had
        self._draining: Set[str] = set()
        self._timers: Dict[str, IDelayedCall] = {}
        # Local tickets: by pool, their waiter key's SEQ (all tried while a
        # write's fate was unknown), and what they queued with.
        self._by_pool: Dict[str, Set[str]] = {}
        self._seqs: Dict[str, List[int]] = {}
        self._info: Dict[str, Ticket] = {}
        self._snapshots: Dict[int, list] = {}  # a status op -> where its snapshot goes
        self._late: Dict[str, Dict[str, int]] = {}  # pool -> {ticket: token}: grants held back, to confirm
        # The last view of each pool (read, or read back after our write),
        # and the last revision at which the watch showed it changed.
        self._views: Dict[str, Tuple[_View, int, Optional[int], int]] = {}
        self._foreign: Dict[str, int] = {}
        self._stopping = False
        self._watch: Any = None
        self._watch_from = 0  # the next revision the watch must deliver
        self._watch_pause = 0.05
        self._presence_sent = 0
        self._presence_seen = 0
        self._presence_checked = 0
        self._keepalive = LoopingCall(self._keep_alive)
        self._checker = LoopingCall(self._check_watch)
        self._backstop = LoopingCall(self._settle_local)

    # -- keys -------------------------------------------------------------------------

    def _pool_key(self, name: str) -> bytes:
        return self._pool_prefix + name.encode()

    def _q(self, name: str) -> bytes:
        return self._q_prefix + name.encode() + b"/"

    def _q_key(self, name: str, seq: int, ticket: str) -> bytes:
        return self._q(name) + b"%016x/" % seq + ticket.encode()

    def _a(self, name: str) -> bytes:
        return self._a_prefix + name.encode() + b"/"

    def _a_key(self, name: str, ticket: str) -> bytes:
        return self._a(name) + ticket.encode()

    def _spec(self, name: str) -> Optional[PoolSpec]:
        spec = self.pools.find(name)
        if spec is None and name in self._draining:
            return self._specs.get(name)
        return spec

    # -- service ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        d = self._ensure_lease()
        d.addErrback(lambda f: self.log.error("etcd: no lease yet ({f.value}); trying again", f=f))
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False).addErrback(self._crashed, "keep-alive")
        self._checker.start(WATCH_CHECK_INTERVAL, now=False).addErrback(self._crashed, "watch check")
        self._backstop.start(BACKSTOP_INTERVAL, now=False).addErrback(self._crashed, "backstop")

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for loop in (self._keepalive, self._checker, self._backstop):
            if loop.running:
                loop.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        leaving = [self._leave(pool, tickets) for pool, tickets in self._answer_waiters().items()]
        d = DeferredList(leaving, consumeErrors=True)

        def revoke(_: object) -> Any:
            if self.lease is not None:
                # Whatever of ours is left (a leave that failed) goes now.
                return ensureDeferred(self.client.revoke(self.lease))
            return None

        d.addCallback(revoke)
        d.addErrback(lambda f: self.log.warn("etcd: could not revoke this server's lease: {f.value}", f=f))

        def close(_: object) -> Any:
            if self._watch is not None:
                self._watch.stop()
            return self.client.close()

        d.addBoth(close)
        return d

    def _log_failure(self, failure: Failure, what: str, pool: str) -> None:
        self.log.error("etcd: {what} {pool}: {f.value}", what=what, pool=pool, f=failure)

    def _crashed(self, failure: Failure, what: str) -> None:
        self.log.failure("the etcd {what} loop stopped", failure, what=what)

    def _probe(self) -> Dict[str, Any]:
        """A cheap linearizable read: etcd answers it only with a quorum."""
        return {"key": _b64(self._pool_prefix), "range_end": _b64(prefix_end(self._pool_prefix)),
                "limit": "1", "keys_only": True}

    def health(self) -> Deferred:
        d = ensureDeferred(self.client.call("/v3/kv/range", self._probe(), deadline=2.0))
        return d.addCallbacks(lambda _: True, lambda _: False)

    def lock_delays(self) -> Dict[str, float]:
        now = self.mono()
        return {name: until - now for name, until in list(self._blocked.items()) if until > now}

    def active_pools(self) -> List[str]:
        named = list(self.pools)
        return named + sorted(self._busy - set(named))

    def draining(self, pool: str) -> Optional[PoolSpec]:
        return self._specs.get(pool) if pool in self._draining else None

    def reconfigure(self, pools: Catalog) -> None:
        super().reconfigure(pools)
        for name in list(self._specs):
            if pools.find(name) is not None:
                self._draining.discard(name)
            elif name in self._busy:
                self._draining.add(name)

    # -- the lease --------------------------------------------------------------------

    def _ensure_lease(self) -> Deferred:
        if self.lease is not None:
            return succeed(self.lease)
        if self._lease_pending is None:
            self._lease_pending = ensureDeferred(self._new_lease())

            def done(result: Any) -> Any:
                self._lease_pending = None
                return result

            self._lease_pending.addBoth(done)
        d: Deferred[int] = Deferred()
        self._lease_pending.addBoth(_fan(d))
        return d

    async def _new_lease(self) -> int:
        lease, ttl, revision = await self.client.grant(SERVER_TTL)
        self.lease = lease
        self.log.info("etcd: lease {lease:x} (TTL {ttl} s) on {endpoint}", lease=lease, ttl=ttl,
                      endpoint=self.client.endpoint)
        if self._watch is None and not self._stopping:
            self._watch_from = revision + 1
            self._start_watch()
        return lease

    def _keep_alive(self) -> Deferred:
        if self.lease is None:
            d = self._ensure_lease()
            d.addCallback(lambda _: self._requeue_all())
            d.addErrback(lambda f: self.log.error("etcd: no lease: {f.value}", f=f))
            return d
        lease = self.lease
        d = ensureDeferred(self.client.keepalive(lease))

        def kept(ttl: int) -> Any:
            if ttl <= 0 and self.lease == lease:
                self._lease_lost("etcd says it has expired")
            return None

        d.addCallbacks(kept, lambda f: self.log.warn("etcd: keep-alive failed: {f.value}", f=f))
        return d

    def _lease_lost(self, why: str) -> None:
        """Our lease ended: etcd dropped our waiter and answer keys. Take a
        new lease and queue our open /wait again."""
        if self.lease is None or self._stopping:
            return
        self.log.critical("etcd: this server's lease ended ({why}): its waiters queue again", why=why)
        self.lease = None
        d = self._ensure_lease()
        d.addCallback(lambda _: self._requeue_all())
        d.addErrback(lambda f: self.log.error("etcd: no new lease yet: {f.value}", f=f))

    def _requeue_all(self) -> None:
        for name, tickets in list(self._by_pool.items()):
            mine = [t for t in tickets if t in self._info]
            if mine:
                d = self._submit(name, _Op(self._requeue_op(mine), need=mine))
                d.addErrback(self._log_failure, "queueing again in", name)

    def _requeue_op(self, tickets: List[str]) -> Operation:
        return lambda pool, now: self._requeue(pool, tickets, now)

    def _requeue(self, pool: Pool, tickets: List[str], now: float) -> Step:
        """Queue again the local tickets that are neither queued nor answered."""
        step = Step()
        for ticket_id in tickets:
            local = self._tickets.get(ticket_id)
            info = self._info.get(ticket_id)
            if local is None or not local.open or info is None:
                continue
            if ticket_id in pool.state.queue or ticket_id in pool.state.answers:
                continue
            step.events += pool.wait(info, now).events
        return step

    # -- operations -------------------------------------------------------------------

    def wait(self, pool: str, host: str, label: str, session: str = "", origin: str = "") -> Deferred:
        ticket_id = f"{self.server_id}.{next(self._ticket_ids)}"
        waiter: Deferred[Event] = Deferred(lambda _: self._abandon(ticket_id))
        local = self._tickets[ticket_id] = LocalTicket(ticket_id, pool, host, session, waiter)
        self._by_pool.setdefault(pool, set()).add(ticket_id)
        server = self.server_id

        def enqueue(p: Pool, now: float) -> Step:
            ticket = Ticket(ticket_id, host, label, now, server, session, origin)
            self._info[ticket_id] = ticket
            return p.wait(ticket, now)

        def enqueued(step: Step) -> Step:
            if step.refused is not None:
                if self._close(ticket_id, LEFT) is not None:
                    waiter.errback(QueueFull(step.refused))
            elif local.state is REGISTERED:
                local.state = QUEUED
            return step

        def failed(reason: Failure) -> None:
            if self._close(ticket_id, LEFT) is not None:
                waiter.errback(reason)
                self._leave(pool, [ticket_id])

        self._apply(pool, enqueue).addCallbacks(enqueued, failed)
        return waiter

    def reset(self, pool: str, host: Optional[str] = None, session: Optional[str] = None,
              origin: str = "") -> Any:
        return self._submit(pool, _Op(lambda p, now: p.reset(now, host, session, origin), full=host is None))

    def _apply(self, pool: str, operation: Operation) -> Deferred:
        return self._submit(pool, _Op(operation))

    def _snapshot(self, name: str) -> Deferred:
        result: List[Tuple[PoolSpec, PoolState, float]] = []
        op = _Op(_tick, full=True)
        d = self._submit(name, op, result)
        return d.addCallback(lambda _: result[0])

    def _leave(self, pool: str, tickets: List[str]) -> Deferred:
        chunks = [tickets[i:i + BATCH] for i in range(0, len(tickets), BATCH)] or [[]]
        ds = []
        for chunk in chunks:
            d = self._submit(pool, _Op(_leave_op(chunk), need=chunk))
            d.addCallback(self._left_after, chunk)
            d.addErrback(self._log_failure, "leaving the queue of", pool)
            ds.append(d)
        return ds[0] if len(ds) == 1 else DeferredList(ds)

    def _left_after(self, _: object, tickets: List[str]) -> None:
        self._left(tickets)

    def _left(self, tickets: List[str]) -> None:
        for ticket_id in tickets:
            self._seqs.pop(ticket_id, None)
            self._info.pop(ticket_id, None)

    def _close(self, ticket_id: str, state: str) -> Optional[Deferred]:
        local = self._tickets.get(ticket_id)
        if local is not None:
            tickets = self._by_pool.get(local.pool)
            if tickets is not None:
                tickets.discard(ticket_id)
                if not tickets:
                    del self._by_pool[local.pool]
            if state is ANSWERED:
                self._seqs.pop(ticket_id, None)
                self._info.pop(ticket_id, None)
        return super()._close(ticket_id, state)

    def _poke(self, name: str) -> None:
        """Settle the pool soon: something changed that may free a slot or
        owe one of our waiters an answer."""
        if name in self._poked or self._stopping:
            return
        self._poked.add(name)
        d = self._submit(name, _Op(_tick, poke=True))
        d.addErrback(self._settle_failed, name)

    def _settle_failed(self, failure: Failure, name: str) -> None:
        self.log.error("etcd: settling {pool}: {f.value}", pool=name, f=failure)
        if name in self._by_pool and not self._stopping:
            self.reactor.callLater(RESETTLE_DELAY, self._poke, name)

    def _settle_local(self) -> None:
        for name in list(self._by_pool):
            self._poke(name)

    # -- batching ---------------------------------------------------------------------

    def _submit(self, name: str, op: _Op, snapshot: Optional[list] = None) -> Deferred:
        if snapshot is not None:
            self._snapshots[id(op)] = snapshot
        self._pending.setdefault(name, []).append(op)
        if name not in self._running:
            self._run(name)
        return op.d

    def _run(self, name: str) -> None:
        pending = self._pending.get(name)
        if not pending:
            self._pending.pop(name, None)
            return
        # A whole-queue read runs alone; others go BATCH at a time.
        if pending[0].full:
            batch = [pending.pop(0)]
        else:
            batch = []
            while pending and not pending[0].full and len(batch) < BATCH:
                batch.append(pending.pop(0))
        if any(op.poke for op in batch):
            self._poked.discard(name)
        self._running.add(name)
        d = ensureDeferred(self._transact(name, batch))
        d.addCallbacks(self._committed, self._failed, callbackArgs=(name, batch), errbackArgs=(name, batch))
        d.addBoth(self._next, name)

    def _next(self, _: object, name: str) -> None:
        self._running.discard(name)
        if self._pending.get(name):
            self._run(name)
        else:
            self._pending.pop(name, None)

    def _failed(self, failure: Failure, name: str, batch: List[_Op]) -> None:
        if not failure.check(BackendUnavailable):
            self.log.failure("etcd transaction on {pool}", failure, pool=name)
            failure = Failure(BackendUnavailable(f"internal error on pool {name!r}"))
        for op in batch:
            self._snapshots.pop(id(op), None)
            op.d.errback(failure)

    def _committed(self, result: _Result, name: str, batch: List[_Op]) -> None:
        late = self._late_grants(name, result)
        # Grants taken for tickets that had left before this commit were
        # never told: given back below.
        untold = [(ticket_id, token) for ticket_id, kind, token in result.taken
                  if kind == GRANTED and ticket_id not in self._tickets]
        for step in result.extra:
            self._dispatch(step)
        for op, step in zip(batch, result.steps):
            self._dispatch(step)
        for ticket_id, kind, token in result.taken:
            local = self._tickets.get(ticket_id)
            if local is not None and ticket_id not in late:
                self._deliver(ticket_id, Event(kind, name, local.host, "", token, ticket_id, result.now,
                                               local.session))
        self._give_back(name, result.state, untold)
        if late:
            self._poke(name)
        self._schedule(name)
        for op, step in zip(batch, result.steps):
            snapshot = self._snapshots.pop(id(op), None)
            if snapshot is not None:
                snapshot.append((self._spec(name), result.state, result.now))
            op.d.callback(step)

    def _late_grants(self, name: str, result: _Result) -> Dict[str, int]:
        """The grants of this transaction to this server's open waiters, if it
        came back too late to deliver them (LATE_GRANT_SHARE): kept in
        ``_late`` for the next transaction to confirm, and not delivered now."""
        # The transaction's plan has dealt with every grant held back before
        # (confirmed it into ``taken``, queued it again, or found it left).
        self._late.pop(name, None)
        spec = self._specs.get(name)
        if spec is None or not spec.expire or self.mono() - result.now <= spec.expire * LATE_GRANT_SHARE:
            return {}
        late = {ticket_id: token for ticket_id, _, token in result.taken}
        for step in result.extra + result.steps:
            for event in step.events:
                if event.kind is GRANTED and event.ticket is not None and event.ticket in self._tickets:
                    late[event.ticket] = event.token  # type: ignore[assignment]  # a grant has a token
        if late:
            self._late[name] = late
            self.log.warn("etcd: the grants to {tickets} in {pool} came back {seconds:.3f} s after they were "
                          "planned: confirming them before answering", tickets=sorted(late), pool=name,
                          seconds=self.mono() - result.now)
        return late

    def _deliver(self, ticket_id: str, event: Event) -> None:
        local = self._tickets.get(ticket_id)
        if event.kind is GRANTED and local is not None and ticket_id in self._late.get(local.pool, {}):
            return  # held back: confirmed (or queued again) by the next transaction
        super()._deliver(ticket_id, event)

    # -- the transaction --------------------------------------------------------------

    def _read_ops(self, name: str, wlo: int, whi: Optional[int], limit: int, need: List[str]) -> List[Dict]:
        q = self._q(name)
        ops = [range_op(self._pool_key(name)), range_op(self._a(name), prefix_end(self._a(name)))]
        end = prefix_end(q) if whi is None else q + b"%016x" % whi
        ops.append(range_op(q + b"%016x" % wlo, end, limit=limit))
        for ticket_id in need:
            for seq in self._seqs.get(ticket_id, ()):
                ops.append(range_op(self._q_key(name, seq, ticket_id)))
        return ops

    def _parse(self, responses: List[Dict], revision: int, mark: int, wlo: int, whi: Optional[int], limit: int,
               exact_count: Optional[int] = None) -> _View:
        view = _View()
        view.revision = revision
        view.mark = mark
        pools, _ = range_kvs(responses[0])
        view.pool = pools[0] if pools else None
        if view.pool is not None:
            try:
                meta = json.loads(view.pool.value)
                if not isinstance(meta, dict) or meta.get("v") != VERSION:
                    raise ValueError("version")
                view.meta = meta
            except ValueError:
                view.meta = {}
        view.answers, _ = range_kvs(responses[1])
        view.head, view.window_count = range_kvs(responses[2])
        seen = {kv.key for kv in view.head}
        for r in responses[3:]:
            kvs, _ = range_kvs(r)
            view.extra += [kv for kv in kvs if kv.key not in seen]
        view.wlo = wlo
        view.whi = whi if whi is not None else 1 << 62
        view.limit = limit
        return view

    async def _read(self, name: str, wlo: int, whi: Optional[int], limit: int, need: List[str],
                    deadline: float) -> _View:
        ops = self._read_ops(name, wlo, whi, limit, need)
        mark = self._sightings
        answer = await self.client.txn([], ops, read_only=True, deadline=max(0.5, deadline - self.mono()))
        return self._parse(answer.get("responses", []), int(answer["header"]["revision"]), mark, wlo, whi, limit)

    def _window(self, name: str, spec: PoolSpec, full: bool, lo: Optional[int] = None
                ) -> Tuple[int, Optional[int], int]:
        """The part of the queue to read: from ``lo`` (the head as last seen)."""
        if lo is None:
            lo = self._lo.get(name, 0)
        if full:
            return lo, None, 0
        return lo, lo + WINDOW, spec.maxlocks + HEAD_EXTRA

    def _check_window(self, view: _View, full: bool) -> None:
        """Whether the waiter keys read are the true head of the queue;
        _Retry with a better window if not. Sets view.total and view.exact."""
        meta = view.meta
        lo, seq, n = int(meta.get("lo", 0)), int(meta.get("seq", 0)), int(meta.get("n", 0))
        if view.pool is None or not meta:
            view.total, view.exact = len(view.head), True
            return
        if view.wlo > lo:
            raise _Retry(lo, lo + (view.whi - view.wlo), view.limit, full)
        covered = view.whi >= seq
        if full:
            view.total, view.exact = len(view.head), True
            return
        if len(view.head) < view.limit and not covered:
            width = max(WINDOW, (view.whi - view.wlo) * 4)
            raise _Retry(lo, min(lo + width, seq), view.limit)
        if covered:
            view.total, view.exact = view.window_count, True
        else:
            view.total, view.exact = max(n, view.window_count), False

    async def _transact(self, name: str, batch: List[_Op]) -> _Result:
        spec = self._spec(name)
        if spec is None:
            raise BackendUnavailable(f"no pool {name!r}")
        self._specs[name] = spec
        start = self.mono()
        deadline = start + OP_DEADLINE
        full = any(op.full for op in batch)
        need = [t for op in batch for t in op.need]
        wlo, whi, limit = self._window(name, spec, full)
        view: Optional[_View] = None
        if not full and not need:
            # What this server last read or wrote: right unless another
            # server changed the pool since, which the txn's compares catch.
            # (A whole-queue read, for /status/, leaves it for the next one.)
            cached = self._views.pop(name, None)
            if cached is not None:
                view, wlo, whi, limit = cached
        confirmed = view is None
        conflicts = 0
        pause = 0.01
        while True:
            if self.mono() > deadline:
                raise BackendUnavailable(f"etcd did not settle pool {name!r} within {OP_DEADLINE:g} s")
            try:
                if view is None:
                    view = await self._read(name, wlo, whi, limit, need, deadline)
                    confirmed = True
                try:
                    self._check_window(view, full)
                except _Retry as r:
                    wlo, whi, limit = r.wlo, (None if r.exact else r.whi), r.limit
                    view = None
                    continue
                now, wall = self.mono(), self.wall()
                try:
                    plan = self._plan(name, spec, view, batch, now, wall)
                except _NeedLease:
                    await self._ensure_lease()
                    continue
                if isinstance(plan, _Retry):
                    wlo, whi, limit = plan.wlo, (None if plan.exact else plan.whi), plan.limit
                    view = None
                    continue
                reads = self._read_ops(name, wlo, whi, limit, need)
                if not plan.writes:
                    if not confirmed:
                        # Nothing to write, from a remembered view: make sure
                        # it is still the truth (a linearizable read).
                        mark = self._sightings
                        answer = await self.client.txn(self._compares(name, view), [], reads, read_only=True,
                                                       deadline=max(0.5, deadline - self.mono()))
                        if not answer.get("succeeded"):
                            view = self._parse(answer.get("responses", []), int(answer["header"]["revision"]),
                                               mark, wlo, whi, limit)
                            confirmed = True
                            continue
                    self._seen_state(name, view, plan.result.state, now)
                    if not full and not need:
                        self._keep_view(name, view, wlo, whi, limit)
                    return plan.result
                for ticket_id, seq in plan.new_seqs.items():
                    self._seqs.setdefault(ticket_id, []).append(seq)  # in case its fate is unknown
                # The view after the txn, for the next operation: from the
                # head as the txn leaves it, so that the window follows the
                # queue (one from an old head would have to be read again
                # once the queue has moved past its end). Built here when the
                # txn's compares pin the view; else the txn reads it back.
                alo, ahi, alimit = wlo, whi, limit
                if plan.value is not None and not full:
                    alo, ahi, alimit = self._window(name, spec, False, int(plan.value.get("lo", wlo)))
                built = plan.changes is not None and not full and not need
                after = [] if built else self._read_ops(name, alo, ahi, alimit, need)
                if len(plan.writes) + len(after) > MAX_TXN_OPS or need:
                    after = []
                mark = self._sightings
                try:
                    answer = await self.client.txn(plan.compares, plan.writes + after, reads)
                except Ambiguous:
                    # Did it land? The pool key names its last writers.
                    view = await self._read(name, wlo, whi, limit, need, deadline)
                    confirmed = True
                    if plan.txn_id in view.meta.get("ids", ()):
                        return self._landed(name, plan, view.pool.mod_revision if view.pool else 0)
                    continue
                revision = int(answer["header"]["revision"])
                if answer.get("succeeded"):
                    if built:
                        self._keep_view(name, self._view_after(name, view, plan.changes or [], revision, mark,
                                                               alo, ahi, alimit), alo, ahi, alimit)
                    elif after:
                        fresh = self._parse(answer.get("responses", [])[len(plan.writes):], revision, mark,
                                            alo, ahi, alimit)
                        self._keep_view(name, fresh, alo, ahi, alimit)
                    return self._landed(name, plan, revision)
                conflicts += 1
                if conflicts > MAX_CONFLICTS:
                    raise BackendUnavailable(f"pool {name!r}: too much contention ({conflicts} conflicts)")
                view = self._parse(answer.get("responses", []), revision, mark, wlo, whi, limit)
                confirmed = True
                if conflicts > 2:
                    await deferLater(self.reactor, random.uniform(0, pause), lambda: None)
                    pause = min(pause * 2, 0.2)
            except NotSent as e:
                if _is_final(e):  # refused: sending it again will not help
                    raise BackendUnavailable(f"pool {name!r}: {e}") from None
                view = None
                await deferLater(self.reactor, pause, lambda: None)
                pause = min(pause * 2, 0.5)
            except Ambiguous:
                view = None
                await deferLater(self.reactor, pause, lambda: None)
                pause = min(pause * 2, 0.5)

    def _compares(self, name: str, view: _View) -> List[Dict]:
        """The view is still the truth: the pool key and every waiter key read are unchanged."""
        compares = [mod_is(self._pool_key(name), view.pool.mod_revision if view.pool is not None else 0)]
        compares += [mod_is(kv.key, kv.mod_revision) for kv in view.head + view.extra]
        return compares[:MAX_TXN_OPS]

    def _view_after(self, name: str, view: _View, changes: List[Change], revision: int, mark: int,
                    wlo: int, whi: Optional[int], limit: int) -> _View:
        """What a read of the window (wlo, whi, limit) would return just after
        a txn that committed ``changes`` at ``revision`` over ``view``, whose
        compares pinned every key the view holds (see _writes)."""
        after = _View()
        after.revision, after.mark = revision, mark
        pool_key, q, a = self._pool_key(name), self._q(name), self._a(name)
        queue = {kv.key: kv for kv in view.head}
        answers = {kv.key: kv for kv in view.answers}
        for key, value, lease in changes:
            if key == pool_key:
                if value is not None:
                    after.pool = KV.written(key, value, revision, lease, view.pool)
                    after.meta = json.loads(value)
                continue
            keys = queue if key.startswith(q) else answers if key.startswith(a) else None
            if keys is None:
                continue
            if value is None:
                keys.pop(key, None)
            else:
                keys[key] = KV.written(key, value, revision, lease, keys.get(key))
        after.answers = sorted(answers.values(), key=lambda kv: kv.key)
        end = 1 << 62 if whi is None else whi
        inside = [kv for kv in sorted(queue.values(), key=lambda kv: kv.key) if wlo <= _seq_of(kv.key)[0] < end]
        after.head = inside[:limit] if limit else inside
        after.window_count = len(inside)
        after.wlo, after.whi, after.limit = wlo, end, limit
        return after

    def _keep_view(self, name: str, view: _View, wlo: int, whi: Optional[int], limit: int) -> None:
        """Remember a view for the pool's next operation, unless the watch
        already showed a later change by someone else."""
        if self._foreign.get(name, 0) <= view.revision:
            self._views[name] = (view, wlo, whi, limit)

    def _plan(self, name: str, spec: PoolSpec, view: _View, batch: List[_Op], now: float, wall: float) -> Any:
        """Apply the batch to the state read: a _Plan, or _Retry when the
        window read was too small for what happened."""
        meta = view.meta
        fresh = view.pool is None or not meta
        state = PoolState(last_token=int(meta.get("tok", 0)))
        old_obs = self._obs.get(name, {})
        obs: Dict[tuple, float] = {}
        pending: Set[int] = set()
        for entry in meta.get("h", ()):
            host, session, label, token, renewals, granted, lease, ticket, server, pend, origin = entry
            version = (host, session, token, renewals)
            first = obs[version] = old_obs.get(version, now)
            state.holders[(host, session)] = Hold(
                host, label, token, min(now, now - (wall - granted)),
                None if lease is None else first + lease, ticket, server, session, renewals, origin)
            if pend:
                pending.add(token)
        loaded_q: Dict[str, KV] = {}
        head_ids: Set[str] = set()
        head_keys = {kv.key for kv in view.head}
        for kv in sorted(view.head + view.extra, key=lambda kv: kv.key):
            try:
                ticket_id, host, session, label, queued, server, origin = json.loads(kv.value)
            except (ValueError, TypeError):
                continue
            loaded_q[ticket_id] = kv
            if kv.key in head_keys:
                head_ids.add(ticket_id)
            state.queue[ticket_id] = Ticket(ticket_id, host, label, min(now, now - (wall - queued)), server,
                                            session, origin)
        loaded_a: Dict[str, KV] = {}
        for kv in view.answers:
            try:
                kind, token, server = json.loads(kv.value)
            except (ValueError, TypeError):
                continue
            ticket_id = kv.key.rsplit(b"/", 1)[1].decode()
            loaded_a[ticket_id] = kv
            state.answers[ticket_id] = Answer(kind, token, server)
        block = meta.get("b")
        if block is not None:
            first = obs[("b", block[0])] = old_obs.get(("b", block[0]), now)
            state.blocked_until = first + block[1]
        hidden = 0 if view.exact else max(0, view.total - len(view.head))
        pool = Pool(partial_spec(spec, hidden), state, self.wall)
        extra: List[Step] = []
        if fresh and view.mark < self._had_holders.get(name, 0):
            # Read before this server saw the pool with holders (a slow
            # answer, overtaken by the watch): not a sign that it vanished.
            return _Retry(view.wlo, view.whi, view.limit)
        if fresh:
            state.last_token = self._floor(name, wall)
            if name in self._had_holders:
                block = [uuid.uuid4().hex[:16], _lock_delay(spec)]
                obs[("b", block[0])] = now
                extra.append(pool.block(now, now + block[1]))
                self.log.critical("etcd lost pool {pool} (its key vanished): granting nothing in it for "
                                  "{delay:g} s so that forgotten holders can finish", pool=name, delay=block[1])
        if block is not None and state.blocked_until <= now:
            block = None  # this server saw the lock-delay through: it ends for everyone
            state.blocked_until = 0.0
            state.last_token = max(state.last_token, self._floor(name, wall))
        # Grants owed to servers whose lease ended: given back.
        orphans = [h.ticket for h in state.holders.values()
                   if h.token in pending and h.ticket is not None and h.ticket not in state.answers]
        if orphans:
            extra.append(_leave_all(pool, [t for t in orphans if t is not None], now))
        # Answers other servers left for our open waiters, and grants of our
        # own that came back late: delivered now, the lease renewed from now;
        # one whose hold has ended queues again.
        owed: List[Tuple[str, str, int]] = []
        for ticket_id, answer in list(state.answers.items()):
            local = self._tickets.get(ticket_id)
            if answer.server == self.server_id and local is not None and local.open:
                del state.answers[ticket_id]
                owed.append((ticket_id, answer.kind, answer.token))
        for ticket_id, token in self._late.get(name, {}).items():
            local = self._tickets.get(ticket_id)
            if local is not None and local.open:  # one that left: its leave gives the hold back
                owed.append((ticket_id, GRANTED, token))
        taken: List[Tuple[str, str, int]] = []
        lapsed: List[str] = []
        for ticket_id, kind, token in owed:
            hold = next((h for h in state.holders.values() if h.token == token), None)
            if hold is None or (hold.expires_at is not None and hold.expires_at <= now):
                lapsed.append(ticket_id)
                continue
            if spec.expire:
                hold.expires_at = now + spec.expire
            hold.renewals += 1
            taken.append((ticket_id, kind, token))
        if lapsed:
            extra.append(self._requeue(pool, lapsed, now))
        steps = [op.fn(pool, now) for op in batch]
        if hidden:
            # The rules saw only the head of the queue: read more if they
            # ran past it (promotion with slots left), or if they granted a
            # waiter read out of order.
            head_left = any(t in head_ids for t in state.queue)
            if not head_left and len(state.holders) < spec.maxlocks and now >= state.blocked_until:
                return _Retry(view.wlo, view.whi + WINDOW * 4, max(view.limit, 1) * 4)
            for s in steps + extra:
                for e in s.events:
                    if e.ticket in loaded_q and e.ticket not in head_ids and e.kind in (GRANTED, RENEWED):
                        return _Retry(view.wlo, view.whi, 0, exact=True)
        if any(s.refused for s in steps) and not view.exact:
            return _Retry(view.wlo, view.whi, view.limit, exact=True)
        for s in steps:
            if s.refused:
                s.refused = queue_full(spec)
        # Answers just made for our own open waiters are delivered by the
        # step's events (Backend._dispatch); the others are written.
        for ticket_id, answer in list(state.answers.items()):
            local = self._tickets.get(ticket_id)
            if ticket_id not in loaded_a and answer.server == self.server_id and local is not None and local.open:
                del state.answers[ticket_id]
        result = _Result(steps, [s for s in extra if s.events], state, taken, now, view.revision)
        if not (result.extra or taken or any(s.events for s in steps)):
            self._obs[name] = obs
            return _Plan(result, [], [], "", obs, None, {})
        return self._writes(name, spec, view, pool, loaded_q, head_ids, loaded_a, block, result, obs, wall)

    def _writes(self, name: str, spec: PoolSpec, view: _View, pool: Pool, loaded_q: Dict[str, KV],
                head_ids: Set[str], loaded_a: Dict[str, KV], block: Optional[list], result: _Result,
                obs: Dict[tuple, float], wall: float) -> "_Plan":
        state = pool.state
        meta = view.meta
        key = self._pool_key(name)
        compares = [mod_is(key, view.pool.mod_revision if view.pool is not None else 0)]
        writes: List[Dict] = []
        changes: List[Change] = []

        def put(k: bytes, value: bytes, lease: int = 0) -> None:
            writes.append(put_op(k, value, lease))
            changes.append((k, value, lease))

        def delete(k: bytes) -> None:
            writes.append(delete_op(k))
            changes.append((k, None, 0))

        for kv in loaded_q.values():
            compares.append(mod_is(kv.key, kv.mod_revision))
        # Waiters gone from the queue (granted, left, reset).
        removed = [t for t in loaded_q if t not in state.queue]
        # Waiters dropped by an operator's reset: their servers learn it from
        # the pool key written in the same revision ("op": "reset").
        resets = any(e.kind == RESET and e.token is None for s in result.steps for e in s.events)
        reset_all = resets and not state.queue and len(removed) > 1 and full_loaded(view)
        if reset_all:
            writes.append(delete_op(self._q(name), prefix_end(self._q(name))))
        else:
            for t in removed:
                delete(loaded_q[t].key)
        # New waiters: ours, at the back, bound to our lease.
        seq = int(meta.get("seq", 0))
        lo = int(meta.get("lo", 0))
        new_seqs: Dict[str, int] = {}
        for ticket_id, ticket in state.queue.items():
            if ticket_id in loaded_q:
                continue
            if self.lease is None:
                raise _NeedLease()
            new_seqs[ticket_id] = seq
            put(self._q_key(name, seq, ticket_id), _dumps(
                [ticket_id, ticket.host, ticket.session, ticket.label, wall - (result.now - ticket.queued_at),
                 ticket.server, ticket.origin]), self.lease)
            seq += 1
        # Answers: taken ones deleted, new ones written bound to their owner's lease.
        grants: Set[int] = set()
        for ticket_id, kv in loaded_a.items():
            if ticket_id not in state.answers:
                compares.append(mod_is(kv.key, kv.mod_revision))
                delete(kv.key)
        for ticket_id, answer in state.answers.items():
            if answer.kind == RESET:
                continue
            if ticket_id in loaded_a:
                if answer.kind == GRANTED:
                    grants.add(answer.token)
                continue
            if answer.server == self.server_id and self.lease is not None:
                owner = self.lease
            elif ticket_id in loaded_q and loaded_q[ticket_id].lease:
                owner = loaded_q[ticket_id].lease
            else:
                continue  # nothing to bind it to: the next transaction gives the hold back
            if answer.kind == GRANTED:
                grants.add(answer.token)
            put(self._a_key(name, ticket_id), _dumps([answer.kind, answer.token, answer.server]), owner)
        # The queue's bounds: no waiter key below ``lo``, ``n`` of them.
        if len(view.head) < view.limit or view.limit == 0:
            scan_end = min(view.whi, int(meta.get("seq", 0)))  # every key below it was read
        else:
            scan_end = max(_seq_of(kv.key)[0] for kv in view.head) + 1
        left_in_head = [_seq_of(loaded_q[t].key)[0] for t in state.queue if t in head_ids]
        new_lo = max(lo, min(left_in_head) if left_in_head else scan_end)
        n = max(0, view.total - len(removed)) + len(new_seqs)
        self._txn_ids += 1
        txn_id = f"{self.server_id}.{self._txn_ids}"
        holders = []
        for h in state.holders.values():
            lease_len = None if h.expires_at is None else h.expires_at - obs.get(
                (h.host, h.session, h.token, h.renewals), result.now)
            holders.append([h.host, h.session, h.label, h.token, h.renewals,
                            wall - (result.now - h.granted_at), lease_len, h.ticket, h.server,
                            # Pending: granted to a waiter that nobody has told yet. A
                            # renewal (the holder asked again, through any server)
                            # means it was told: never given back as an orphan.
                            1 if h.token in grants and h.renewals == 0 else 0, h.origin])
        value: Dict[str, Any] = {
            "v": VERSION, "tok": state.last_token, "seq": seq, "lo": new_lo, "n": n, "h": holders,
            "b": block if state.blocked_until > result.now else None,
            "ids": list(meta.get("ids", ()))[-(RECENT_IDS - 1):] + [txn_id],
        }
        if resets:
            value["op"] = "reset"
        put(key, _dumps(value))
        if len(writes) > MAX_TXN_OPS or len(compares) > MAX_TXN_OPS:
            raise BackendUnavailable(
                f"pool {name!r}: one change needs {max(len(writes), len(compares))} etcd operations, "
                f"more than etcd's --max-txn-ops ({MAX_TXN_OPS})")
        # The compares pin the whole view when it held the whole queue and
        # every answer it read is deleted here: an answer kept is not
        # compared, and its lease could end unseen before the commit. A key
        # whose value did not parse is not compared either.
        pinned = (view.pool is not None and bool(meta) and not reset_all and not view.extra and view.exact
                  and len(view.head) == view.total == len(loaded_q) and len(view.answers) == len(loaded_a)
                  and all(t not in state.answers for t in loaded_a))
        return _Plan(result, compares, writes, txn_id, obs, value, new_seqs, changes if pinned else None)

    def _landed(self, name: str, plan: "_Plan", revision: int) -> _Result:
        """A write committed: what it wrote is now what this server knows.
        The versions it made are timed from now, after the commit."""
        now = self.mono()
        obs, value = plan.obs, plan.value
        if value is not None:
            for entry in value["h"]:
                obs.setdefault((entry[0], entry[1], entry[3], entry[4]), now)
            if value["b"] is not None:
                obs.setdefault(("b", value["b"][0]), now)
            self._obs[name] = obs
            self._remember(name, value)
        for ticket_id, seq in plan.new_seqs.items():
            self._seqs[ticket_id] = [seq]
        plan.result.revision = revision
        return plan.result

    def _seen_state(self, name: str, view: _View, state: PoolState, now: float) -> None:
        if view.meta:
            self._remember(name, view.meta)

    def _remember(self, name: str, meta: Dict[str, Any]) -> None:
        """What this server last saw of a pool: for timers, status, tokens."""
        self._lo[name] = max(self._lo.get(name, 0), int(meta.get("lo", 0)))
        holds = meta.get("h", ())
        self._holds[name] = [((e[0], e[1], e[3], e[4]), e[6]) for e in holds]
        token = int(meta.get("tok", 0))
        if token > self._last_token.get(name, 0):
            self._last_token[name] = token
        self._sightings += 1
        if holds:
            self._had_holders[name] = self._sightings
        else:
            self._had_holders.pop(name, None)
        if holds or int(meta.get("n", 0)) > 0:
            self._busy.add(name)
        else:
            self._busy.discard(name)
            if name in self._draining:
                self._draining.discard(name)
        block = meta.get("b")
        if block is not None:
            first = self._obs.setdefault(name, {}).setdefault(("b", block[0]), self.mono())
            self._blocked[name] = first + block[1]
        else:
            self._blocked.pop(name, None)

    def _floor(self, name: str, wall: float) -> int:
        return max(self._last_token.get(name, 0), int((wall + TOKEN_FLOOR_MARGIN) * TOKEN_RESOLUTION))

    # -- timers -----------------------------------------------------------------------

    def _schedule(self, name: str) -> None:
        """A timer at the pool's next deadline, while this server has waiters in it."""
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()
        if name not in self._by_pool or self._stopping:
            return
        obs = self._obs.get(name, {})
        now = self.mono()
        deadlines = [obs.get(version, now) + lease for version, lease in self._holds.get(name, ())
                     if lease is not None]
        if name in self._blocked:
            deadlines.append(self._blocked[name])
        if deadlines:
            delay = max(0.0, min(deadlines) - now) + 0.0005
            self._timers[name] = self.reactor.callLater(delay, self._due, name)

    def _due(self, name: str) -> None:
        self._timers.pop(name, None)
        self._poke(name)

    # -- the watch --------------------------------------------------------------------

    def _start_watch(self) -> None:
        if self._stopping:
            return
        watch = self._watch = self.client.watch(self._prefix, prefix_end(self._prefix), self._watch_from,
                                                self._on_watch)
        watch.done.addCallback(self._watch_ended, watch)

    def _watch_ended(self, error: Optional[str], watch: Any) -> None:
        if watch is not self._watch or self._stopping:
            return
        self._watch = None
        if error:
            self.log.warn("etcd: watch ended ({error}); watching again from revision {rev}", error=error,
                          rev=self._watch_from)
        if error and "compacted" in error:
            self._compacted()
            return
        self.client._failed_over(watch.endpoint)
        pause = self._watch_pause
        self._watch_pause = min(self._watch_pause * 2, 1.0)
        self.reactor.callLater(pause, self._start_watch)

    def _compacted(self) -> None:
        """The watch fell behind etcd's compaction: events were lost. Start
        again from now and settle every pool with local waiters."""

        async def restart() -> None:
            answer = await self.client.call("/v3/kv/range", self._probe())
            self._watch_from = int(answer["header"]["revision"]) + 1
            self._start_watch()
            self._settle_local()
            self._requeue_all()

        def failed(f: Failure) -> None:
            self.log.error("etcd: restarting the watch: {f.value}", f=f)
            self.reactor.callLater(1.0, self._compacted)

        ensureDeferred(restart()).addErrback(failed)

    def _check_watch(self) -> Any:
        """Write our presence key; the watch must have shown the last one."""
        if self._presence_sent and self._presence_seen < self._presence_checked and self._watch is not None:
            self.log.warn("etcd: the watch on {endpoint} is silent; watching again elsewhere",
                          endpoint=self._watch.endpoint)
            self._watch.stop()
        self._presence_checked = self._presence_sent
        if self.lease is None:
            return None
        self._presence_sent += 1
        payload = {"key": _b64(self._server_prefix + self.server_id.encode()),
                   "value": _b64(b"%d" % self._presence_sent), "lease": str(self.lease)}
        d = ensureDeferred(self.client.request("/v3/kv/put", payload))
        d.addErrback(self._presence_failed)
        return d

    def _presence_failed(self, failure: Failure) -> None:
        if "lease not found" in str(failure.value):
            self._lease_lost("etcd no longer knows it")
        else:
            self.log.warn("etcd: presence: {f.value}", f=failure)

    def _on_watch(self, result: Dict[str, Any]) -> None:
        if result.get("canceled") or result.get("compact_revision"):
            if self._watch is not None:
                self._watch.error = "compacted" if result.get("compact_revision") else "canceled"
                self._watch.stop()
            return
        events = result.get("events")
        if not events:
            return
        self._watch_pause = 0.05
        now = self.mono()
        # Events of one revision come together: a txn's pool key and the
        # waiter and answer keys it changed.
        groups: Dict[int, List[Tuple[str, bool, List[bytes], KV]]] = {}
        for event in events:
            kv = KV(event["kv"])
            deleted = event.get("type") == "DELETE"
            rest = kv.key[len(self._prefix):].split(b"/")
            groups.setdefault(kv.mod_revision, []).append((rest[0].decode(), deleted, rest[1:], kv))
        for revision in sorted(groups):
            self._watch_from = max(self._watch_from, revision + 1)
            self._on_revision(groups[revision], now)

    def _on_revision(self, events: List[Tuple[str, bool, List[bytes], KV]], now: float) -> None:
        written: Dict[str, Optional[Dict[str, Any]]] = {}
        # Remembered views follow the change, unless they already hold it
        # (our own txn read the pool back at this revision).
        revision = events[0][3].mod_revision
        following: Dict[str, bool] = {}
        for kind, deleted, parts, kv in events:
            if kind in ("pool", "q", "a") and parts:
                name = parts[0].decode()
                if revision > self._foreign.get(name, 0):
                    self._foreign[name] = revision
                if name not in following:
                    cached = self._views.get(name)
                    following[name] = cached is not None and cached[0].revision < revision
                if following[name] and not _follow(self._views[name][0], kind, deleted, parts, kv):
                    del self._views[name]
                    following[name] = False

        for kind, deleted, parts, kv in events:
            if kind == "pool" and parts:
                name = parts[0].decode()
                meta: Optional[Dict[str, Any]] = None
                if not deleted:
                    try:
                        meta = json.loads(kv.value)
                    except ValueError:
                        meta = None
                written[name] = meta
                if meta is not None and meta.get("v") == VERSION:
                    obs = self._obs.setdefault(name, {})
                    for e in meta.get("h", ()):
                        obs.setdefault((e[0], e[1], e[3], e[4]), now)
                    self._remember(name, meta)
                    self._schedule(name)
            elif kind == "server" and parts and parts[0].decode() == self.server_id and not deleted:
                try:
                    self._presence_seen = max(self._presence_seen, int(kv.value))
                except ValueError:
                    pass
        for kind, deleted, parts, kv in events:
            if kind not in ("q", "a") or len(parts) < 2:
                continue
            name = parts[0].decode()
            ticket_id = parts[-1].decode()
            local = self._tickets.get(ticket_id)
            if kind == "a" and not deleted:
                if local is not None and local.open:
                    self._poke(name)  # an answer for one of ours: take it
                continue
            if not deleted:
                continue
            if name in written:
                meta = written[name]
                if kind == "q" and meta is not None and meta.get("op") == "reset" and local is not None \
                        and local.open:
                    self._deliver(ticket_id, Event(RESET, name, local.host, "", None, ticket_id, now,
                                                   local.session))
                continue
            # Deleted with no pool txn: a lease ended.
            if local is not None and local.open and ticket_id.startswith(self.server_id + "."):
                self._lease_lost("our waiter keys vanished")
            elif name in self._by_pool:
                self._poke(name)


def _follow(view: _View, kind: str, deleted: bool, parts: List[bytes], kv: KV) -> bool:
    """Bring a remembered view up to date with one event of its pool; False
    when the view can no longer say what the head of the queue is."""
    if kind == "pool":
        if deleted:
            return False
        try:
            meta = json.loads(kv.value)
        except ValueError:
            return False
        if not isinstance(meta, dict) or meta.get("v") != VERSION:
            return False
        view.pool, view.meta = kv, meta
    elif kind == "a" and len(parts) == 2:
        view.answers = [a for a in view.answers if a.key != kv.key]
        if not deleted:
            view.answers.append(kv)
    elif kind == "q" and len(parts) == 3:
        seq = int(parts[1], 16)
        inside = view.wlo <= seq < view.whi
        if deleted:
            before = len(view.head)
            view.head = [h for h in view.head if h.key != kv.key]
            view.extra = [h for h in view.extra if h.key != kv.key]
            if inside:
                view.window_count -= 1
            if before > len(view.head) and view.limit and before >= view.limit and view.window_count > len(view.head):
                if not view.head:
                    return False  # the next waiter after the head is unknown
                # Waiter keys are only ever added at the back, so what is
                # left of the head is the first keys of the window: the view
                # is now that of a read with a smaller limit.
                view.limit = len(view.head)
        elif inside:
            view.window_count += 1
            if not view.limit or len(view.head) < view.limit:
                if view.head and kv.key < view.head[-1].key:
                    return False
                view.head.append(kv)
    else:
        return False
    view.revision = max(view.revision, kv.mod_revision)
    return True


def _leave_op(tickets: List[str]) -> Operation:
    return lambda pool, now: _leave_all(pool, tickets, now)


def full_loaded(view: _View) -> bool:
    return view.limit == 0


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _fan(d: Deferred) -> Callable[[Any], Any]:
    def fire(result: Any) -> Any:
        if isinstance(result, Failure):
            d.errback(result)
            return None
        d.callback(result)
        return result
    return fire


__all__ = ["EtcdBackend", "unb64"]
