"""Pool states kept in memcached, shared by several distributex servers.

Every change is one compare-and-swap transaction: read the pool's record
with ``gets``, apply one pool rule (distributex.pool, the same rules as the
in-memory backend), write it back with ``cas`` (or ``add`` when the record
is new). A conflict means another server changed the pool in between: the
transaction starts again from the fresh record, a bounded number of times,
after a short random pause. Nothing is ever written without CAS, so two
servers can never both grant the last slot.

Transactions run in a bounded thread pool, because pymemcache blocks; the
reactor thread only hands grants to waiting connections.

Across servers:

- each server marks itself alive with a key that expires unless refreshed
  (``PRESENCE_TTL``); queued tickets name their server, and a ticket whose
  server has gone is dropped by whichever server next touches the pool;
- a server polls, every ``poll_interval``, the pools in which it has local
  waiters, to see grants that other servers made to them (a release through
  this server hands over at once, without a poll);
- a memcached that lost its data (restarted, flushed, evicted) is detected
  by the epoch key or by a record gone while holds were known; the pool then
  grants nothing for one lease length, so that holders it forgot can finish.
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from distributex.backend.base import Backend, BackendUnavailable, Operation
from distributex.config import DEFAULT_EXPIRE, Config, PoolSpec
from distributex.pool import GRANTED, RENEWED, Answer, Event, Hold, Pool, PoolState, Step, Ticket

#: A server refreshes its presence key this often ...
PRESENCE_REFRESH = 1.0
#: ... and the key lives this long (memcached counts whole seconds), so a
#: dead server's waiters lose their places within about five seconds, while
#: a live one survives a few slow refreshes.
PRESENCE_TTL = 5
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


class _ConnectionFailed(BackendUnavailable):
    """The connection failed at once (refused, reset, closed): worth another try."""


class _FixedRendezvousHash(RendezvousHash):
    """Rendezvous hashing that never drops a node.

    HashClient removes a failing memcached from its ring, which moves that
    memcached's keys to another one; for a lock service that would be a
    fresh, empty pool record and a second grant. A pool must always live on
    the same memcached: when it is down, requests get ERROR instead.
    """

    def remove_node(self, node: Any) -> None:
        pass


def make_client(servers: Tuple[Tuple[str, int], ...]) -> HashClient:
    return HashClient(
        list(servers), hasher=_FixedRendezvousHash, use_pooling=True,
        connect_timeout=MEMCACHE_TIMEOUT, timeout=MEMCACHE_TIMEOUT,
        retry_attempts=0, ignore_exc=False, default_noreply=False, no_delay=True)


# -- the record ---------------------------------------------------------------

def encode(state: PoolState) -> bytes:
    return json.dumps({
        "h": [[h.host, h.label, h.token, h.granted_at, h.expires_at, h.ticket, h.server, h.session, h.renewals]
              for h in state.holders.values()],
        "q": [[t.id, t.host, t.label, t.queued_at, t.server, t.session] for t in state.queue.values()],
        "a": {tid: [a.kind, a.token, a.server] for tid, a in state.answers.items()},
        "t": state.last_token,
        "b": state.blocked_until,
    }, separators=(",", ":")).encode()


def decode(raw: bytes) -> PoolState:
    data = json.loads(raw)
    state = PoolState(last_token=data["t"], blocked_until=data["b"])
    for h in data["h"]:
        hold = Hold(*h)
        state.holders[hold.key] = hold
    for t in data["q"]:
        state.queue[t[0]] = Ticket(*t)
    for tid, a in data.get("a", {}).items():
        state.answers[tid] = Answer(*a)
    return state


class MemcacheBackend(Backend):
    shared = True

    def __init__(self, config: Config, reactor: IReactorTime, client: Any = None) -> None:
        super().__init__(config.pools, reactor)
        self.namespace = config.namespace
        self.poll_interval = config.poll_interval
        self.client = client if client is not None else make_client(config.memcache_servers)
        self.threads = ThreadPool(minthreads=1, maxthreads=MAX_THREADS, name="distributex-memcache")
        # One transaction per pool at a time from this server: local
        # requests queue here instead of fighting each other with CAS.
        self._locks = {name: DeferredLock() for name in self.pools}
        # Pools whose record we last saw holding or queueing: if such a
        # record vanishes, memcached lost it.
        self._known_busy: Set[str] = set()
        self._epoch: Optional[bytes] = None
        self._presence: Dict[str, Tuple[bool, float]] = {}  # server id -> (alive, checked at)
        # Tickets that left locally but whose leave has not reached
        # memcached yet (it was down): retried by the poller.
        self._orphans: Dict[str, str] = {}  # ticket id -> pool
        # Local tickets seen in their pool's record: if one vanishes without
        # a grant (memcached lost its data), the poller queues it again.
        self._queued: Dict[str, Ticket] = {}
        self._polling: Set[str] = set()
        self._poller = LoopingCall(self._poll)
        self._heartbeat = LoopingCall(self._beat)

    # -- keys ------------------------------------------------------------------

    def _pool_key(self, name: str) -> str:
        return f"{self.namespace}:pool:{name}"

    def _server_key(self, server_id: str) -> str:
        return f"{self.namespace}:server:{server_id}"

    @property
    def _epoch_key(self) -> str:
        return f"{self.namespace}:epoch"

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threads.start()
        self._heartbeat.start(PRESENCE_REFRESH, now=True).addErrback(self._crashed, "heartbeat")
        self._poller.start(self.poll_interval, now=False).addErrback(self._crashed, "poller")

    def stopService(self) -> Deferred:
        super().stopService()
        for loop in (self._poller, self._heartbeat):
            if loop.running:
                loop.stop()
        leaving = [self._leave(pool, tickets) for pool, tickets in self._answer_waiters().items()]
        d = DeferredList(leaving, consumeErrors=True)
        # Other servers may drop our remaining tickets at once instead of
        # waiting for the presence key to expire.
        d.addCallback(lambda _: self._in_thread(self._call, self.client.delete, self._server_key(self.server_id)))
        d.addErrback(lambda f: self.log.warn("could not clear this server's presence: {f.value}", f=f))
        d.addBoth(lambda _: self.threads.stop())
        return d

    def _crashed(self, failure: Any, what: str) -> None:
        self.log.failure("the memcache {what} stopped", failure, what=what)

    # -- operations ----------------------------------------------------------------

    def _in_thread(self, f: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.threads, f, *args)

    def _run(self, name: str, operation: Operation) -> Deferred:
        d = self._locks[name].run(self._in_thread, self._transact, name, operation)
        d.addCallback(self._committed, name)
        return d

    def _apply(self, name: str, operation: Operation) -> Deferred:
        return self._run(name, operation).addCallback(lambda result: result[0])

    def _snapshot(self, name: str) -> Deferred:
        return self._run(name, _tick).addCallback(
            lambda result: (self.pools[name], result[1], self.reactor.seconds()))

    def _committed(self, result: Tuple[Step, PoolState, Dict[str, Answer]], name: str
                   ) -> Tuple[Step, PoolState, Dict[str, Answer]]:
        step, state, answers = result
        self._dispatch(step)
        # Grants that other servers made to our tickets: the transaction took
        # their outcomes out of the record, so each is delivered once, here.
        for ticket_id, answer in answers.items():
            local = self._tickets.get(ticket_id)
            if local is not None:
                self._deliver(ticket_id, Event(answer.kind, name, local.host, "", answer.token,
                                               ticket_id, self.reactor.seconds(), local.session))
        for ticket_id, local in self._tickets.items():
            if local.pool == name:
                ticket = state.queue.get(ticket_id)
                if ticket is not None:
                    self._queued[ticket_id] = ticket  # seen queued: see _requeue
        return result

    def _close(self, ticket_id: str, state: str) -> Optional[Deferred]:
        self._queued.pop(ticket_id, None)
        return super()._close(ticket_id, state)

    def _leave(self, pool: str, tickets: List[str]) -> Deferred:
        for ticket_id in tickets:
            self._orphans[ticket_id] = pool
        return super()._leave(pool, tickets)

    def _left(self, tickets: List[str]) -> None:
        for ticket_id in tickets:
            self._orphans.pop(ticket_id, None)

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

    def _transact(self, name: str, operation: Operation) -> Tuple[Step, PoolState, Dict[str, Answer]]:
        # After a memcached restart every pooled connection (one per thread)
        # is dead, and each fails once, at once, before pymemcache replaces
        # it. Retrying is safe: the transaction starts again from a fresh
        # read, and an operation whose write did land finds itself done.
        for _ in range(MAX_THREADS):
            try:
                return self._try_transact(name, operation)
            except _ConnectionFailed:
                pass
        return self._try_transact(name, operation)

    def _try_transact(self, name: str, operation: Operation) -> Tuple[Step, PoolState, Dict[str, Answer]]:
        spec = self.pools[name]
        key = self._pool_key(name)
        for attempt in range(MAX_CAS_ATTEMPTS):
            raw, cas = self._call(self.client.gets, key)
            now = self.reactor.seconds()
            if raw is not None:
                state = decode(raw)
            elif self._epoch_lost():
                self._block_all()
                continue  # read the blocked record _block_all wrote
            else:
                state = self._fresh_state(spec, now)
            pool = Pool(spec, state)
            pruned = self._prune(pool, now)
            step = operation(pool, now)
            step.events[:0] = pruned
            answers = pool.take_answers(self.server_id)
            if not step.events and not answers and (raw is not None or not state.blocked_until):
                self._note(name, state)
                return step, state, answers  # nothing to write
            data = encode(state)
            if raw is None:
                stored = self._call(self.client.add, key, data, noreply=False)
            else:
                stored = self._call(self.client.cas, key, data, cas, noreply=False)
            if stored:
                self._note(name, state)
                return step, state, answers
            time.sleep(random.uniform(0, CAS_BACKOFF * 2 ** attempt))
        raise BackendUnavailable(f"pool {name!r}: too much contention ({MAX_CAS_ATTEMPTS} CAS conflicts)")

    def _note(self, name: str, state: PoolState) -> None:
        if state.holders or state.queue:
            self._known_busy.add(name)
        else:
            self._known_busy.discard(name)

    def _fresh_state(self, spec: PoolSpec, now: float) -> PoolState:
        """The state of a pool with no record: new, or evicted while we knew it busy."""
        if spec.name not in self._known_busy:
            return PoolState()
        self._known_busy.discard(spec.name)
        delay = spec.expire or DEFAULT_EXPIRE
        self.log.critical(
            "memcached lost the record of busy pool {pool} (evicted? run memcached with -M): "
            "granting nothing in it for {delay:g} s so that forgotten holders can finish",
            pool=spec.name, delay=delay)
        return PoolState(blocked_until=now + delay)

    def _epoch_lost(self) -> bool:
        """True when memcached no longer has the epoch this server saw: it lost its data."""
        epoch = self._call(self.client.get, self._epoch_key)
        if epoch is not None and epoch == self._epoch:
            return False
        known = self._epoch
        if epoch is None:
            if not self._call(self.client.add, self._epoch_key, uuid.uuid4().hex.encode(), noreply=False):
                pass  # another server wrote it first
            epoch = self._call(self.client.get, self._epoch_key)
        self._epoch = epoch
        return known is not None

    def _block_all(self) -> None:
        """memcached lost its data: every pool whose record is gone grants nothing
        for one lease length, like Chubby's lock-delay."""
        now = self.reactor.seconds()
        for spec in self.pools.values():
            state = PoolState(blocked_until=now + (spec.expire or DEFAULT_EXPIRE))
            if self._call(self.client.add, self._pool_key(spec.name), encode(state), noreply=False):
                self.log.critical(
                    "memcached lost its data (restarted or flushed): pool {pool} grants "
                    "nothing for {delay:g} s so that forgotten holders can finish",
                    pool=spec.name, delay=state.blocked_until - now)

    def _prune(self, pool: Pool, now: float) -> List[Event]:
        """Drop queued tickets whose server has died."""
        others = {t.server for t in pool.state.queue.values() if t.server != self.server_id}
        if not others:
            return []
        stale = [s for s in others if s not in self._presence or self._presence[s][1] < now - PRESENCE_REFRESH]
        if stale:
            found = self._call(self.client.get_many, [self._server_key(s) for s in stale])
            for s in stale:
                self._presence[s] = (self._server_key(s) in found, now)
        dead = {s for s in others if not self._presence[s][0]}
        if not dead:
            return []
        # A ticket younger than the presence TTL may belong to a server that
        # has not written its presence yet.
        return pool.prune(lambda t: t.server in dead and t.queued_at < now - PRESENCE_TTL, now).events

    # -- background work ----------------------------------------------------------

    def _beat(self) -> Deferred:
        def beat() -> None:
            self._call(self.client.set, self._server_key(self.server_id), b"1",
                       expire=PRESENCE_TTL, noreply=False)
            if self._epoch_lost():
                self._block_all()
        d = self._in_thread(beat)
        d.addErrback(lambda f: self.log.error("memcached heartbeat failed: {f.value}", f=f))
        return d

    def _poll(self) -> None:
        """Re-read the pools where local connections wait (grants by other
        servers, expiries, dead servers' tickets) or where a leave is owed."""
        waiting = {local.pool for local in self._tickets.values()}
        for name in (waiting | set(self._orphans.values())) - self._polling:
            self._polling.add(name)
            owed = [t for t, pool in self._orphans.items() if pool == name]
            mine = [t for t in self._queued.values() if t.id in self._tickets and self._tickets[t.id].pool == name]
            d = self._leave(name, owed) if owed else self._apply(name, lambda p, now: _requeue(p, mine, now))
            d.addErrback(lambda f, name=name: self.log.error(
                "polling pool {pool}: {f.value}", pool=name, f=f))
            d.addBoth(lambda _, name=name: self._polling.discard(name))


def _tick(pool: Pool, now: float) -> Step:
    return pool.tick(now)


def _requeue(pool: Pool, tickets: List[Ticket], now: float) -> Step:
    """Settle the pool, and queue again the local tickets that vanished from it.

    A ticket this server saw queued that is neither queued nor granted any
    more was lost with memcached's data (or dropped by a server that took
    this one for dead): its connection still waits, so it queues again, at
    the back, since the order was lost too.
    """
    step = pool.tick(now)
    for ticket in tickets:
        if ticket.id not in pool.state.queue and ticket.id not in pool.state.answers:
            step.events += pool.wait(ticket, now).events
    return step
