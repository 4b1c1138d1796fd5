"""The pool rules: queue, slots, leases, fencing tokens, re-entrancy.

A Pool is a state machine over a PoolState. It knows nothing of HTTP, of
storage or of the reactor: every operation takes the current time and
returns a Step (the hold granted, if any, and the events that happened).
The in-memory backend keeps one PoolState per pool for ever; the memcache
backend loads one, applies an operation and stores it back with
compare-and-swap. Both therefore obey exactly the same rules.

The rules:

- at most ``maxlocks`` distinct holders hold the pool; a holder is the pair
  (host, session), where the session is "" for a request that names none
  (the 2014 behaviour: the host alone);
- waiters are granted strictly in the order they queued, and a ``get``
  never overtakes a waiter;
- a hold ends ``expire`` seconds after its grant or its last renewal, and
  every operation first ends the holds that are due;
- a holder that holds and asks again is renewed: same token, one slot;
- every new grant takes a token larger than any the pool gave before.

A queued ticket's life: queued (in ``queue``), then granted or renewed
(it leaves the queue as its holder gets the slot), or left (its connection
went away, or its server died). On a shared backend the server holding the
ticket's connection is often not the one that applied the transition, so
the outcome is kept in ``answers`` until that server takes it: a grant is
delivered from its own transition, never guessed from what else the record
holds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from distributex.config import PoolSpec
from distributex.token import next_token

#: A holder: (host, session); session "" when the request named none.
HolderKey = Tuple[str, str]

QUEUED = "queued"
GRANTED = "granted"
RENEWED = "renewed"
RELEASED = "released"
EXPIRED = "expired"
LEFT = "left"
RESET = "reset"  # an operator force-ended a hold, or dropped a waiter
BLOCKED = "blocked"  # a lock-delay began: the pool grants nothing until it ends
LAPSED = "lapsed"  # an answer kind, not an event: a grant that ended before it was delivered

#: Why a /get was answered NO (contract section 5).
BUSY = "busy"
QUEUED_AHEAD = "queued ahead"
LOCK_DELAY = "lock-delay"


@dataclass
class Hold:
    host: str
    label: str
    token: int
    granted_at: float
    expires_at: Optional[float]  # None: never expires
    ticket: Optional[str] = None  # the /wait that this hold was granted to
    server: Optional[str] = None  # the distributex server that granted it
    session: str = ""
    # Counts the renewals of this grant: with the token it names one
    # version of the lease, for backends that time leases by observation.
    renewals: int = 0
    origin: str = ""  # who asked for it: client address, and access name (the audit log)

    @property
    def key(self) -> HolderKey:
        return (self.host, self.session)


@dataclass
class Ticket:
    """A place in the queue: one open /wait."""

    id: str
    host: str
    label: str
    queued_at: float
    server: Optional[str] = None  # the distributex server holding the connection
    session: str = ""
    origin: str = ""  # who asked: client address, and access name

    @property
    def key(self) -> HolderKey:
        return (self.host, self.session)


@dataclass
class Answer:
    """The outcome of a queued ticket, kept until the server holding its
    connection delivers it (shared backends only)."""

    kind: str  # GRANTED, RENEWED, RESET (dropped by an operator: answered NO), or LAPSED
    token: int
    server: str


@dataclass
class PoolState:
    holders: Dict[HolderKey, Hold] = field(default_factory=dict)
    queue: "OrderedDict[str, Ticket]" = field(default_factory=OrderedDict)  # ticket id -> Ticket, FIFO
    answers: Dict[str, Answer] = field(default_factory=dict)  # ticket id -> its undelivered outcome
    last_token: int = 0
    # No grant before this time: set when a shared backend lost the pool's
    # record, so that holders it forgot cannot be joined by new ones.
    blocked_until: float = 0.0


class Event:
    """Something that happened to a pool, announced to observers."""

    __slots__ = ("kind", "pool", "host", "label", "token", "ticket", "at", "session", "origin")

    def __init__(self, kind: str, pool: str, host: str, label: str,
                 token: Optional[int], ticket: Optional[str], at: float, session: str = "",
                 origin: str = "") -> None:
        self.kind = kind
        self.pool = pool
        self.host = host
        self.label = label
        self.token = token
        self.ticket = ticket
        self.at = at
        self.session = session
        # Who caused it: the requester's address and access name; "" for
        # what the server did by itself (an expiry).
        self.origin = origin

    def __repr__(self) -> str:
        return (f"Event({self.kind}, pool={self.pool!r}, host={self.host!r}, session={self.session!r}, "
                f"token={self.token}, ticket={self.ticket})")


class Step:
    """What one operation did: the caller's hold (granted, renewed, or for a
    release the one that ended) and the events."""

    __slots__ = ("hold", "events", "refused", "reason")

    def __init__(self) -> None:
        self.hold: Optional[Hold] = None
        self.events: List[Event] = []
        self.refused: Optional[str] = None  # why a wait was not queued (the queue is full)
        self.reason: Optional[str] = None  # why a get was not granted: BUSY, QUEUED_AHEAD, LOCK_DELAY

    @property
    def changed(self) -> bool:
        return bool(self.events)


def queue_full(spec: PoolSpec) -> str:
    """Why a /wait was refused (a shared backend that read only the head of
    the queue words it with the real limit)."""
    return f"the queue of pool '{spec.name}' is full ({spec.max_waiters} waiters)"


class Pool:
    """The rules of one pool applied to one PoolState."""

    __slots__ = ("spec", "state", "wall")

    def __init__(self, spec: PoolSpec, state: Optional[PoolState] = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.state = state if state is not None else PoolState()
        # Tokens floor at the wall clock (distributex.token); deadlines use
        # the ``now`` each operation is given, in the backend's own clock.
        self.wall = wall

    # -- operations ----------------------------------------------------------

    def get(self, host: str, label: str, now: float, server: Optional[str] = None,
            session: str = "", origin: str = "") -> Step:
        """Try once: grant if a slot is free and nobody waits; renew a holder."""
        step = self._settle(Step(), now)
        hold = self.state.holders.get((host, session))
        if hold is not None:
            self._renew(hold, label, now, None, step.events, origin)
            step.hold = hold
        elif not self.state.queue and self._has_free_slot(now):
            step.hold = self._grant(host, session, label, now, None, server, step.events, origin)
        else:
            step.reason = self._why_not(now)
        return step

    def _why_not(self, now: float) -> str:
        if self.state.queue:
            return QUEUED_AHEAD
        if now < self.state.blocked_until and len(self.state.holders) < self.spec.maxlocks:
            until = self.wall() + (self.state.blocked_until - now)
            return f"{LOCK_DELAY} until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
        return BUSY

    def wait(self, ticket: Ticket, now: float) -> Step:
        """Join the queue; granted at once when nobody is ahead and a slot is free."""
        step = self._settle(Step(), now)
        hold = self.state.holders.get(ticket.key)
        if hold is not None:
            # Answered by this step itself: no answer is kept for it.
            self._renew(hold, ticket.label, now, ticket.id, step.events, ticket.origin)
            step.hold = hold
        elif not self.state.queue and self._has_free_slot(now):
            step.hold = self._grant(ticket.host, ticket.session, ticket.label, now, ticket.id,
                                    ticket.server, step.events, ticket.origin)
        elif len(self.state.queue) >= self.spec.max_waiters:
            step.refused = queue_full(self.spec)
        else:
            self.state.queue[ticket.id] = ticket
            step.events.append(Event(QUEUED, self.spec.name, ticket.host, ticket.label, None, ticket.id,
                                     now, ticket.session, ticket.origin))
        return step

    def release(self, host: str, now: float, session: str = "", origin: str = "") -> Step:
        """End the holder's hold; step.hold is the hold that ended, if there was one."""
        step = self._settle(Step(), now)
        hold = step.hold = self.state.holders.pop((host, session), None)
        if hold is not None:
            step.events.append(Event(RELEASED, self.spec.name, host, hold.label, hold.token, hold.ticket,
                                     now, session, origin))
            if self.state.queue:
                self._promote(now, step.events)
        return step

    def leave(self, ticket_id: str, now: float) -> Step:
        """A waiter has gone: drop its place, or its hold if the grant raced the departure."""
        # The leaver goes first: settling the pool before would grant it a
        # slot on its way out (a lease ended and nobody had noticed yet).
        step = Step()
        ticket = self.state.queue.pop(ticket_id, None)
        answer = self.state.answers.pop(ticket_id, None)
        if ticket is not None:
            step.events.append(Event(LEFT, self.spec.name, ticket.host, ticket.label, None, ticket_id, now,
                                     ticket.session, ticket.origin))
        elif answer is None or answer.kind == GRANTED:
            # A grant nobody was told of is given back; a renewal at the
            # head of the queue was of a hold granted to another request.
            # A hold renewed since its grant has been told of: its holder
            # asked again (through another request or server) and was
            # answered YES, so it is not given back.
            for hold in self.state.holders.values():
                if hold.ticket == ticket_id and hold.renewals == 0:
                    del self.state.holders[hold.key]
                    step.events.append(Event(RELEASED, self.spec.name, hold.host, hold.label, hold.token,
                                             ticket_id, now, hold.session, hold.origin))
                    break
        return self._settle(step, now)

    def give_back(self, ticket_id: str, token: int, renewals: int, now: float) -> Step:
        """A grant taken for delivery to a waiter that had gone meanwhile
        (it hung up while the transaction that took it was in flight): nobody
        was told, so its hold ends, unless renewed since it was taken (its
        holder asked again and was told YES)."""
        step = Step()
        for hold in self.state.holders.values():
            if hold.ticket == ticket_id and hold.token == token and hold.renewals == renewals:
                del self.state.holders[hold.key]
                step.events.append(Event(RELEASED, self.spec.name, hold.host, hold.label, hold.token, ticket_id,
                                         now, hold.session, hold.origin))
                break
        return self._settle(step, now)

    def tick(self, now: float) -> Step:
        """End the holds that are due and hand their slots on."""
        return self._settle(Step(), now)

    def prune(self, gone: Callable[[Ticket], bool], now: float) -> Step:
        """Drop the queued tickets for which ``gone`` says their server has died."""
        step = Step()
        for ticket in [t for t in self.state.queue.values() if gone(t)]:
            del self.state.queue[ticket.id]
            step.events.append(Event(LEFT, self.spec.name, ticket.host, ticket.label, None, ticket.id, now,
                                     ticket.session, ticket.origin))
        return self._settle(step, now)

    def reset(self, now: float, host: Optional[str] = None, session: Optional[str] = None,
              origin: str = "") -> Step:
        """Force-end holds: the holder (host, session); every hold of the host
        when session is None; or, with no host, every hold and every queued
        ticket of the pool. step.hold is None; the events say what ended."""
        step = Step()
        state = self.state
        ended = [h for h in state.holders.values()
                 if host is None or (h.host == host and (session is None or h.session == session))]
        for hold in ended:
            del state.holders[hold.key]
            step.events.append(Event(RESET, self.spec.name, hold.host, hold.label, hold.token, hold.ticket,
                                     now, hold.session, origin))
        if host is None:
            for ticket in list(state.queue.values()):
                del state.queue[ticket.id]
                step.events.append(Event(RESET, self.spec.name, ticket.host, ticket.label, None, ticket.id,
                                         now, ticket.session, origin))
                if ticket.server is not None:
                    state.answers[ticket.id] = Answer(RESET, 0, ticket.server)
        return self._settle(step, now)

    def block(self, now: float, until: float) -> Step:
        """Begin a lock-delay: no grant before ``until`` (a shared backend
        lost the pool's record, and with it holders it cannot see)."""
        step = Step()
        if until > self.state.blocked_until:
            self.state.blocked_until = until
            step.events.append(Event(BLOCKED, self.spec.name, "", "", None, None, now))
        return step

    def take_answers(self, server: str, now: Optional[float] = None) -> Dict[str, Answer]:
        """Remove and return the outcomes owed to ``server``'s tickets.

        With ``now`` (the delivery is now), a grant is delivered only if its
        hold is still live, and its lease is renewed from now: the client
        counts its lease from the YES it is about to get, so the server must
        not count it from a grant made a poll, or a paused server, ago. A
        grant whose hold has ended meanwhile (it expired before anyone was
        told) comes back as LAPSED: its waiter has to queue again.
        """
        answers = self.state.answers
        mine = {tid: a for tid, a in answers.items() if a.server == server}
        for tid, answer in mine.items():
            del answers[tid]
            if now is None or answer.kind == RESET:
                continue
            hold = next((h for h in self.state.holders.values() if h.token == answer.token), None)
            if hold is None:
                mine[tid] = Answer(LAPSED, answer.token, server)
            elif self.spec.expire:
                hold.expires_at = now + self.spec.expire
                hold.renewals += 1
        return mine

    def drop_answers(self, gone: Callable[[str], bool]) -> None:
        """Forget the outcomes owed to servers that ``gone`` says have died."""
        answers = self.state.answers
        for tid in [tid for tid, a in answers.items() if gone(a.server)]:
            del answers[tid]

    # -- queries -------------------------------------------------------------

    def idle(self) -> bool:
        """Nobody holds and nobody waits (an answer may still be owed)."""
        state = self.state
        return not state.holders and not state.queue and not state.answers

    def next_deadline(self) -> Optional[float]:
        """When the state next changes by itself (a hold expires, a block lifts)."""
        deadlines = [h.expires_at for h in self.state.holders.values() if h.expires_at is not None]
        if self.state.queue and self.state.blocked_until:
            deadlines.append(self.state.blocked_until)
        return min(deadlines) if deadlines else None

    # -- the rules -----------------------------------------------------------

    def _settle(self, step: Step, now: float) -> Step:
        """End the holds that are due, then grant queued tickets the free slots."""
        holders = self.state.holders
        if holders:
            # A loop, not a comprehension: this runs on every operation.
            due = []
            for hold in holders.values():
                if hold.expires_at is not None and hold.expires_at <= now:
                    due.append(hold)
            for hold in due:
                del holders[hold.key]
                step.events.append(Event(EXPIRED, self.spec.name, hold.host, hold.label, hold.token,
                                         hold.ticket, now, hold.session, hold.origin))
        if self.state.queue:
            self._promote(now, step.events)
        return step

    def _has_free_slot(self, now: float) -> bool:
        return len(self.state.holders) < self.spec.maxlocks and now >= self.state.blocked_until

    def _promote(self, now: float, events: List[Event]) -> None:
        queue = self.state.queue
        holders = self.state.holders
        while queue:
            ticket = next(iter(queue.values()))
            hold = holders.get(ticket.key)
            if hold is not None:
                # The holder queued again: re-entrant, its place costs no slot.
                del queue[ticket.id]
                self._renew(hold, ticket.label, now, ticket.id, events, ticket.origin)
                kind, token = RENEWED, hold.token
            elif self._has_free_slot(now):
                del queue[ticket.id]
                token = self._grant(ticket.host, ticket.session, ticket.label, now, ticket.id,
                                    ticket.server, events, ticket.origin).token
                kind = GRANTED
            else:
                break
            if ticket.server is not None:
                self.state.answers[ticket.id] = Answer(kind, token, ticket.server)

    def _grant(self, host: str, session: str, label: str, now: float, ticket: Optional[str],
               server: Optional[str], events: List[Event], origin: str) -> Hold:
        token = next_token(self.state.last_token, self.wall())
        self.state.last_token = token
        expire = self.spec.expire
        hold = Hold(host, label, token, now, now + expire if expire else None, ticket, server, session, 0, origin)
        self.state.holders[(host, session)] = hold
        events.append(Event(GRANTED, self.spec.name, host, label, token, ticket, now, session, origin))
        return hold

    def _renew(self, hold: Hold, label: str, now: float, ticket: Optional[str], events: List[Event],
               origin: str) -> None:
        if self.spec.expire:
            hold.expires_at = now + self.spec.expire
        hold.renewals += 1
        if label:
            hold.label = label
        events.append(Event(RENEWED, self.spec.name, hold.host, hold.label, hold.token, ticket, now,
                            hold.session, origin))
