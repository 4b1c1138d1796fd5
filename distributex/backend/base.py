"""What every backend shares: operations expressed on the pool rules,
delivery of grants to local waiters, and observers.

A backend keeps pool states somewhere and applies one rule of
distributex.pool at a time to one of them (``_apply``). Everything here is
written once on top of that primitive; a backend only says where the state
lives and how an update is made atomic.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from distributex.config import PoolSpec
from distributex.pool import GRANTED, RELEASED, RENEWED, Event, Hold, Pool, PoolState, Step, Ticket

Operation = Callable[[Pool, float], Step]
Observer = Callable[[Event], None]


class BackendUnavailable(Exception):
    """The shared state cannot be reached; nothing was granted or lost."""


class ShuttingDown(Exception):
    """The server is stopping; an open /wait gets NO."""


class Backend(Service):
    """Pool operations for the HTTP resource, over some store of PoolStates.

    Subclasses implement ``_apply(name, operation)``, returning a Deferred
    that fires with the committed Step, after calling ``_dispatch`` on it.
    """

    log = Logger()

    def __init__(self, pools: Dict[str, PoolSpec], reactor: IReactorTime) -> None:
        self.pools = pools
        self.reactor = reactor
        # Names tickets uniquely across every server sharing one store.
        self.server_id = uuid.uuid4().hex[:12]
        self._ticket_ids = itertools.count(1)
        self._waiting: Dict[str, Deferred] = {}  # ticket id -> the /wait's Deferred
        self._tickets: Dict[str, Tuple[str, str]] = {}  # ticket id -> (pool, host)
        self.observers: List[Observer] = []

    # -- the operations the HTTP resource uses --------------------------------

    def get(self, pool: str, host: str, label: str) -> Deferred:
        """Fire with the caller's Hold if granted or renewed, else None."""
        server = self.server_id
        return self._apply(pool, lambda p, now: p.get(host, label, now, server)).addCallback(_hold)

    def release(self, pool: str, host: str) -> Deferred:
        """Fire with True if the host held the pool."""
        return self._apply(pool, lambda p, now: p.release(host, now)).addCallback(_released, host)

    def wait(self, pool: str, host: str, label: str) -> Deferred:
        """Queue for the pool; fire with the granting Event.

        Cancelling the Deferred (a timeout, a dropped connection) leaves the
        queue, or releases the hold if the grant raced the cancellation.
        """
        ticket_id = f"{self.server_id}.{next(self._ticket_ids)}"
        waiter = Deferred(lambda _: self._abandon(ticket_id))
        self._waiting[ticket_id] = waiter
        self._tickets[ticket_id] = (pool, host)
        server = self.server_id

        def enqueue(p: Pool, now: float) -> Step:
            return p.wait(Ticket(ticket_id, host, label, now, server), now)

        def failed(reason: Failure) -> None:
            if self._forget(ticket_id) is not None:
                waiter.errback(reason)
                # The store may have taken the ticket before the error: do
                # not leave a place in the queue that nobody will answer.
                self._leave(pool, [ticket_id])

        self._apply(pool, enqueue).addErrback(failed)
        return waiter

    def status(self, names: Iterable[str]) -> Deferred:
        """Fire with [(PoolSpec, PoolState, now)] for the named pools, expiry applied."""
        results: List[Tuple[PoolSpec, PoolState, float]] = []
        d: Deferred = succeed(None)
        for name in names:
            def one(_: object, name: str = name) -> Deferred:
                return self._snapshot(name).addCallback(results.append)
            d.addCallback(one)
        return d.addCallback(lambda _: results)

    def local_waiters(self) -> int:
        return len(self._waiting)

    # -- what subclasses provide ---------------------------------------------

    def _apply(self, pool: str, operation: Operation) -> Deferred:
        raise NotImplementedError

    def _snapshot(self, pool: str) -> Deferred:
        """Fire with (PoolSpec, PoolState, now) for one pool."""
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
            if event.ticket is not None and (event.kind is GRANTED or event.kind is RENEWED):
                waiter = self._forget(event.ticket)
                if waiter is not None:
                    waiter.callback(event)

    def _forget(self, ticket_id: str) -> Optional[Deferred]:
        self._tickets.pop(ticket_id, None)
        return self._waiting.pop(ticket_id, None)

    def _abandon(self, ticket_id: str) -> None:
        pool, _ = self._tickets.get(ticket_id, (None, None))
        if self._forget(ticket_id) is not None and pool is not None:
            self._leave(pool, [ticket_id])

    def _leave(self, pool: str, tickets: List[str]) -> Deferred:
        """Take these local tickets out of the pool's queue (or their holds, if granted)."""
        d = self._apply(pool, lambda p, now: _leave_all(p, tickets, now))
        d.addCallbacks(lambda _: self._left(tickets), lambda f: self.log.error(
            "leaving the queue of {pool}: {f.value}", pool=pool, f=f))
        return d

    def _left(self, tickets: List[str]) -> None:
        """The store has taken these tickets out (a hook for shared backends)."""

    def _answer_waiters(self) -> Dict[str, List[str]]:
        """Answer every local waiter with ShuttingDown; return their tickets by pool."""
        by_pool: Dict[str, List[str]] = {}
        for ticket_id in list(self._waiting):
            pool, _ = self._tickets[ticket_id]
            by_pool.setdefault(pool, []).append(ticket_id)
            waiter = self._forget(ticket_id)
            if waiter is not None:
                waiter.errback(ShuttingDown())
        return by_pool


def _leave_all(pool: Pool, tickets: List[str], now: float) -> Step:
    step = Step()
    for ticket_id in tickets:
        step.events += pool.leave(ticket_id, now).events
    return step


def _hold(step: Step) -> Optional[Hold]:
    return step.hold


def _released(step: Step, host: str) -> bool:
    return any(e.kind is RELEASED and e.host == host for e in step.events)
