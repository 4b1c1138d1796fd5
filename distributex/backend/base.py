"""What every backend shares: operations expressed on the pool rules,
delivery of grants to local waiters, and observers.

A backend keeps pool states somewhere and applies one rule of
distributex.pool at a time to one of them (``_apply``). Everything here is
written once on top of that primitive; a backend only says where the state
lives and how an update is made atomic.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from distributex.catalog import Catalog, PoolSpec
from distributex.pool import BUSY, GRANTED, RENEWED, RESET, Event, Hold, Pool, PoolState, Step, Ticket

Operation = Callable[[Pool, float], Step]
Observer = Callable[[Event], None]

# The life of a local ticket (one open /wait on this server), owned by the
# backend and changed on the reactor thread only:
#: the /wait arrived; its enqueue has not been committed yet;
REGISTERED = "registered"
#: the store holds it in the pool's queue;
QUEUED = "queued"
#: its grant (or renewal) was delivered to the connection: final;
ANSWERED = "answered"
#: it left: cancelled (timeout, hang-up), failed, or shut down: final.
LEFT = "left"


class LocalTicket:
    """An open /wait of this server: its place in a pool and its connection."""

    __slots__ = ("id", "pool", "host", "session", "waiter", "state")

    def __init__(self, id: str, pool: str, host: str, session: str, waiter: Deferred) -> None:
        self.id = id
        self.pool = pool
        self.host = host
        self.session = session
        self.waiter = waiter
        self.state = REGISTERED

    @property
    def open(self) -> bool:
        return self.state is REGISTERED or self.state is QUEUED


class BackendUnavailable(Exception):
    """The shared state cannot be reached; nothing was granted or lost."""


class ShuttingDown(Exception):
    """The server is stopping; an open /wait gets NO."""


class QueueFull(Exception):
    """The pool's queue holds max_waiters already; str() says so."""


class WaitReset(Exception):
    """An operator reset the pool: the open /wait gets NO (409)."""


class Backend(Service):
    """Pool operations for the HTTP resource, over some store of PoolStates.

    Subclasses implement ``_apply(name, operation)`` and ``_snapshot(name)``:
    where the state lives and how one change to it is made atomic.
    """

    log = Logger()

    #: Whether other servers share the state: tickets and holds then name
    #: this server, and queued tickets' outcomes are kept in the state
    #: until this server delivers them (PoolState.answers).
    shared = False

    def __init__(self, pools: Catalog, reactor: IReactorTime) -> None:
        self.pools = pools
        self.reactor = reactor
        # Names tickets uniquely across every server sharing one store.
        self.server_id = uuid.uuid4().hex[:12]
        self._ticket_ids = itertools.count(1)
        self._tickets: Dict[str, LocalTicket] = {}  # the open ones only
        self.observers: List[Observer] = []

    # -- the operations the HTTP resource uses --------------------------------
    # Each answers with a value, or with a Deferred of it when the backend
    # has to wait for its store (see ``_apply``). The hot paths test for the
    # value, a plain class: isinstance(x, Deferred) goes through ABCMeta
    # (Deferred is an Awaitable) and costs several times more.

    def get(self, pool: str, host: str, label: str, session: str = "", origin: str = "") -> Any:
        """The caller's Hold if granted or renewed, else why not (a str:
        busy, queued ahead, lock-delay until T)."""
        server = self.server_id if self.shared else None
        step = self._apply(pool, lambda p, now: p.get(host, label, now, server, session, origin))
        return _hold(step) if isinstance(step, Step) else step.addCallback(_hold)

    def release(self, pool: str, host: str, session: str = "", origin: str = "") -> Any:
        """True if the holder (host, session) held the pool."""
        step = self._apply(pool, lambda p, now: p.release(host, now, session, origin))
        return step.hold is not None if isinstance(step, Step) else step.addCallback(_released)

    def reset(self, pool: str, host: Optional[str] = None, session: Optional[str] = None,
              origin: str = "") -> Any:
        """Force-end the holder's hold (every hold of the host without a
        session), or every hold and waiter of the pool without a host; the
        Step, or a Deferred of it."""
        return self._apply(pool, lambda p, now: p.reset(now, host, session, origin))

    def wait(self, pool: str, host: str, label: str, session: str = "", origin: str = "") -> Deferred:
        """Queue for the pool; fire with the granting Event.

        Cancelling the Deferred (a timeout, a dropped connection) leaves the
        queue, or releases the hold if the grant raced the cancellation.
        """
        ticket_id = f"{self.server_id}.{next(self._ticket_ids)}"
        waiter: Deferred[Event] = Deferred(lambda _: self._abandon(ticket_id))
        local = self._tickets[ticket_id] = LocalTicket(ticket_id, pool, host, session, waiter)
        server = self.server_id if self.shared else None

        def enqueue(p: Pool, now: float) -> Step:
            return p.wait(Ticket(ticket_id, host, label, now, server, session, origin), now)

        def enqueued(step: Step) -> Step:
            # Its own step answered it (_dispatch), or it is now queued, or
            # the queue was full.
            if step.refused is not None:
                if self._close(ticket_id, LEFT) is not None:
                    waiter.errback(QueueFull(step.refused))
            elif local.state is REGISTERED:
                local.state = QUEUED
            return step

        def failed(reason: Failure) -> None:
            if self._close(ticket_id, LEFT) is not None:
                waiter.errback(reason)
                # The store may have taken the ticket before the error: do
                # not leave a place in the queue that nobody will answer.
                self._leave(pool, [ticket_id])

        queued = self._apply(pool, enqueue)
        if isinstance(queued, Deferred):
            queued.addCallbacks(enqueued, failed)
        else:
            enqueued(queued)
        return waiter

    def status(self, names: Iterable[str]) -> Deferred:
        """Fire with [(PoolSpec, PoolState, now)] for the named pools, expiry applied."""
        results: List[Tuple[PoolSpec, PoolState, float]] = []
        d: Deferred[Any] = succeed(None)
        for name in names:
            d.addCallback(self._snapshot_after, name)
            d.addCallback(results.append)
        return d.addCallback(lambda _: results)

    def _snapshot_after(self, _: object, name: str) -> Any:
        return self._snapshot(name)

    def health(self) -> Deferred[bool]:
        """Whether the store answers (for /health)."""
        return succeed(True)

    def draining(self, pool: str) -> Optional[PoolSpec]:
        """The spec of a pool that a reload removed while it still had
        holds or waiters (they run out; nothing new is taken), else None."""
        return None

    def lock_delays(self) -> Dict[str, float]:
        """Seconds left of each pool's lock-delay, for the pools in one."""
        return {}

    def reconfigure(self, pools: Catalog) -> None:
        """Serve these pools from now on, keeping every hold and waiter:
        a changed expire or maxlocks applies to the next grant or renewal."""
        self.pools = pools

    def active_pools(self) -> List[str]:
        """The pools /status/ lists by default: the named ones, and those
        made on demand that this backend knows to be in use."""
        return list(self.pools)

    def local_waiters(self) -> int:
        return len(self._tickets)

    # -- what subclasses provide ---------------------------------------------

    def _apply(self, pool: str, operation: Operation) -> Any:
        """Apply one rule to the pool's state; the committed Step, or a Deferred of it.

        It calls ``_dispatch`` on the Step before answering. A backend that
        changes its state on the reactor thread answers at once: a request
        then costs no Deferred, and a handoff happens in the same call.
        """
        raise NotImplementedError

    def _snapshot(self, pool: str) -> Any:
        """(PoolSpec, PoolState, now) for one pool, or a Deferred of it."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------

    def _dispatch(self, step: Step) -> None:
        """Tell observers what happened, then hand grants to their local waiters.

        Observers hear the whole step first: a waiter's callback may start
        another operation (its connection has gone, so it releases), whose
        events must not be announced before the ones that caused them.
        """
        events = step.events
        for observer in self.observers:
            for event in events:
                observer(event)
        for event in events:
            if event.ticket is not None and (event.kind is GRANTED or event.kind is RENEWED
                                             or event.kind is RESET):
                self._deliver(event.ticket, event)

    def _deliver(self, ticket_id: str, event: Event) -> None:
        """The ticket's own outcome: answer its /wait, once: YES for a grant
        or renewal, NO for a reset."""
        if event.kind is RESET:
            if event.token is None:  # a dropped waiter, not the reset of its hold
                waiter = self._close(ticket_id, LEFT)
                if waiter is not None:
                    waiter.errback(WaitReset())
            return
        waiter = self._close(ticket_id, ANSWERED)
        if waiter is not None:
            waiter.callback(event)

    def _close(self, ticket_id: str, state: str) -> Optional[Deferred]:
        """End an open local ticket's life in ``state``; its Deferred, or None
        if it was not open (a ticket is answered or leaves only once)."""
        local = self._tickets.pop(ticket_id, None)
        if local is None:
            return None
        local.state = state
        return local.waiter

    def _give_back(self, pool: str, state: PoolState, taken: List[Tuple[str, int]]) -> None:
        """Grants a transaction took for this server's waiters, (ticket,
        token), whose waiters left before they could be told (a hang-up
        while it was in flight): their holds end now, as the leave that
        follows would have ended them had the grant not been taken."""
        untold = [(ticket_id, token, hold.renewals) for ticket_id, token in taken
                  for hold in state.holders.values() if hold.token == token and hold.ticket == ticket_id]
        if untold:
            d = self._apply(pool, lambda p, now: _give_back_all(p, untold, now))
            if isinstance(d, Deferred):
                d.addErrback(lambda f: self.log.error("giving back untold grants in {pool}: {f.value}", pool=pool,
                                                      f=f))

    def _abandon(self, ticket_id: str) -> None:
        local = self._tickets.get(ticket_id)
        if local is not None and self._close(ticket_id, LEFT) is not None:
            self._leave(local.pool, [ticket_id])

    def _leave(self, pool: str, tickets: List[str]) -> Any:
        """Take these local tickets out of the pool's queue (or their holds, if granted)."""
        left = self._apply(pool, lambda p, now: _leave_all(p, tickets, now))
        if not isinstance(left, Deferred):
            return self._left(tickets)
        return left.addCallbacks(lambda _: self._left(tickets), lambda f: self.log.error(
            "leaving the queue of {pool}: {f.value}", pool=pool, f=f))

    def _left(self, tickets: List[str]) -> None:
        """The store has taken these tickets out (a hook for shared backends)."""

    def _answer_waiters(self) -> Dict[str, List[str]]:
        """Answer every local waiter with ShuttingDown; return their tickets by pool."""
        by_pool: Dict[str, List[str]] = {}
        for ticket_id, local in list(self._tickets.items()):
            by_pool.setdefault(local.pool, []).append(ticket_id)
            waiter = self._close(ticket_id, LEFT)
            if waiter is not None:
                waiter.errback(ShuttingDown())
        return by_pool


def _leave_all(pool: Pool, tickets: List[str], now: float) -> Step:
    step = Step()
    for ticket_id in tickets:
        step.events += pool.leave(ticket_id, now).events
    return step


def _give_back_all(pool: Pool, untold: List[Tuple[str, int, int]], now: float) -> Step:
    step = Step()
    for ticket_id, token, renewals in untold:
        step.events += pool.give_back(ticket_id, token, renewals, now).events
    return step


def partial_spec(spec: PoolSpec, hidden: int) -> PoolSpec:
    """The spec as the rules see a queue of which only the head was read:
    the ``hidden`` waiters behind it count against max_waiters (a refusal
    must then be worded with the real limit: pool.queue_full)."""
    if hidden <= 0:
        return spec
    return dataclasses.replace(spec, max_waiters=spec.max_waiters - hidden)


def _hold(step: Step) -> Union[Hold, str]:
    return step.hold or step.reason or BUSY


def _released(step: Step) -> bool:
    return step.hold is not None
