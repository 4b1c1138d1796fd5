"""Random sequences of get, wait, release, leave, renew, timeouts and clock
advances never break safety, FIFO, lease ends or token order.

Two machines share one model of a pool, built only from the events the rules
announce, and check every event against it as it happens:

- safety: a grant never makes more than maxlocks holders, nor two holds for
  one host;
- FIFO and no barging: a grant or renewal to a queued ticket is to the head
  of the queue; a grant outside the queue (a /get, or a /wait answered at
  once) happens only when nobody queues;
- tokens: every new grant has a token larger than any before; a renewal
  keeps the holder's token;
- leases: a hold never expires before its deadline;
- answers: a /wait told YES names its own host, and that host holds the
  pool, with that token, once the step is over.

RulesMachine drives distributex.pool.Pool directly at arbitrary times (as
the memcache backend does: nothing happens between operations);
BackendMachine drives InMemoryBackend over a Clock, so leases must also end
with no request, and waits are Deferreds that time out and get cancelled.
"""

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock

from distributex.backend.memory import InMemoryBackend
from distributex.config import PoolSpec
from distributex.pool import (
    EXPIRED,
    GRANTED,
    LEFT,
    QUEUED,
    RELEASED,
    RENEWED,
    Hold,
    Pool,
    Ticket,
)

pytestmark = pytest.mark.timeout(180)

T0 = 1_700_000_000.0
# Few hosts, so that the same host often holds and queues again (re-entrancy).
# A holder is (host, session): h0 also asks in a session of its own, which
# must count as another holder.
HOSTS = [("h0", ""), ("h0", "s"), ("h1", ""), ("h2", "")]
SERVERS = ["s1", "s2"]
# Dyadic numbers only, so that every deadline is exact in floating point
# and "at the deadline" means exactly that. Leases that end within a few
# steps are drawn most often: expiry racing other operations is the point.
EXPIRES = [0, 0.5, 1.0, 1.0, 2.5]
MAXLOCKS = [1, 1, 2, 3]
STEPS = [0.25, 0.5, 1.0, 1.75, 3.0]

# No explain phase: it doubles the time of a failing run and adds little to
# a shrunk sequence of rules.
SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def holder(e):
    return (e.host, e.session)


class PoolModel(RuleBasedStateMachine):
    """The model, and the check of each event against it."""

    def setup_model(self, maxlocks, expire):
        self.maxlocks = maxlocks
        self.expire = expire
        self.holders = {}  # host -> [token, deadline, ticket]
        self.queue = []  # ticket ids, FIFO
        self.ticket_host = {}
        self.last_token = 0
        self.told_yes = []  # (ticket, host, token) answered in the current step
        self.granted_tickets = set()  # every ticket ever granted or renewed
        self.last_ticket = None  # the ticket of the latest event that had one

    def now(self):
        raise NotImplementedError

    def observe(self, e):
        now = self.now()
        assert e.at == now
        if e.kind == QUEUED:
            assert e.ticket not in self.queue
            assert holder(e) not in self.holders, "a holder's /wait must renew, not queue"
            self.queue.append(e.ticket)
            self.ticket_host[e.ticket] = holder(e)
        elif e.kind == GRANTED:
            assert holder(e) not in self.holders, "two holds for one host"
            assert len(self.holders) < self.maxlocks, "more than maxlocks holders"
            self.take_turn(e)
            assert e.token > self.last_token, "token did not increase"
            self.last_token = e.token
            self.holders[holder(e)] = [e.token, now + self.expire if self.expire else None, e.ticket]
        elif e.kind == RENEWED:
            assert holder(e) in self.holders
            assert e.token == self.holders[holder(e)][0], "a renewal changed the token"
            self.take_turn(e)
            if self.expire:
                self.holders[holder(e)][1] = now + self.expire
            self.holders[holder(e)][2] = None  # told of: its holder knows it holds
        elif e.kind == RELEASED:
            assert holder(e) in self.holders and self.holders[holder(e)][0] == e.token
            del self.holders[holder(e)]
        elif e.kind == EXPIRED:
            assert holder(e) in self.holders and self.holders[holder(e)][0] == e.token
            deadline = self.holders[holder(e)][1]
            assert deadline is not None and deadline <= now, "a hold expired early"
            del self.holders[holder(e)]
        elif e.kind == LEFT:
            assert e.ticket in self.queue
            self.queue.remove(e.ticket)
        else:
            raise AssertionError(f"unknown event {e!r}")
        if e.ticket is not None and e.kind in (GRANTED, RENEWED):
            self.told_yes.append((e.ticket, holder(e), e.token))
            self.granted_tickets.add(e.ticket)
        if e.ticket is not None:
            self.last_ticket = e.ticket

    def take_turn(self, e):
        if e.ticket in self.queue:
            assert self.queue[0] == e.ticket, "a waiter was granted out of turn"
            self.queue.pop(0)
        elif e.kind == GRANTED:
            assert not self.queue, "a grant overtook the queue"

    def end_of_step(self, releasing=None):
        """Every /wait told YES in this step holds the pool now, with that token.

        Except for the host that released in this step: a hold is the
        host's, so its /release ends the hold that its own /wait was just
        granted (by an expiry that the release was the first to notice).
        """
        for ticket, host, token in self.told_yes:
            if host == releasing:
                continue
            assert host in self.holders and self.holders[host][0] == token, \
                f"the /wait {ticket} of {host} was told YES but {host} does not hold the pool"
        self.told_yes = []

    def state(self):
        raise NotImplementedError

    @invariant()
    def safety(self):
        assert len(self.state().holders) <= self.maxlocks

    @invariant()
    def the_model_is_the_state(self):
        state = self.state()
        assert {h: hold.token for h, hold in state.holders.items()} == \
            {h: v[0] for h, v in self.holders.items()}
        assert list(state.queue) == self.queue


class RulesMachine(PoolModel):
    """The pure rules, called at arbitrary times, as a shared backend calls them."""

    @initialize(maxlocks=st.sampled_from(MAXLOCKS), expire=st.sampled_from(EXPIRES))
    def start(self, maxlocks, expire):
        self.setup_model(maxlocks, expire)
        self.pool = Pool(PoolSpec("p", expire=expire, maxlocks=maxlocks))
        self.time = T0
        self.serial = 0
        self.ticket_server = {}
        self.synced = True  # an operation has run since the clock moved

    def now(self):
        return self.time

    def state(self):
        return self.pool.state

    def apply(self, step, releasing=None):
        for event in step.events:
            self.observe(event)
        self.end_of_step(releasing)
        self.synced = True
        return step

    @rule(host=st.sampled_from(HOSTS))
    def get(self, host):
        step = self.apply(self.pool.get(host[0], "", self.time, None, host[1]))
        if step.hold is not None:
            assert self.holders[host][0] == step.hold.token

    @rule(host=st.sampled_from(HOSTS), server=st.sampled_from(SERVERS))
    def wait(self, host, server):
        self.serial += 1
        tid = f"t{self.serial}"
        self.ticket_server[tid] = server
        self.apply(self.pool.wait(Ticket(tid, host[0], "", self.time, server, host[1]), self.time))

    @rule(host=st.sampled_from(HOSTS))
    def release(self, host):
        self.apply(self.pool.release(host[0], self.time, host[1]), releasing=host)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def renew(self, data):
        host = data.draw(st.sampled_from(sorted(self.holders)))
        due = self.holders[host][1] is not None and self.holders[host][1] <= self.time
        step = self.apply(self.pool.get(host[0], "", self.time, None, host[1]))
        if not due:
            assert [e.kind for e in step.events if holder(e) == host] == [RENEWED]

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def leave(self, data):
        tid = data.draw(st.sampled_from(self.queue))
        step = self.apply(self.pool.leave(tid, self.time))
        assert not [e for e in step.events if e.ticket == tid and e.kind in (GRANTED, RENEWED)], \
            "a waiter was granted as it left"
        assert tid not in self.queue

    @precondition(lambda self: any(v[2] for v in self.holders.values()))
    @rule(data=st.data())
    def leave_racing_its_grant(self, data):
        host = data.draw(st.sampled_from(sorted(h for h, v in self.holders.items() if v[2])))
        token, _deadline, tid = self.holders[host]
        self.apply(self.pool.leave(tid, self.time))
        # Only a grant nobody was told of is given back: a renewed one stays.
        assert self.holders.get(host, [None])[0] != token, "a departed waiter kept its grant"

    @rule(server=st.sampled_from(SERVERS))
    def prune(self, server):
        dead = {t for t in self.queue if self.ticket_server[t] == server}
        step = self.apply(self.pool.prune(lambda t: t.server == server, self.time))
        assert not [e for e in step.events if e.ticket in dead and e.kind in (GRANTED, RENEWED)], \
            "a ticket of a dead server was granted"

    @rule()
    def tick(self):
        self.apply(self.pool.tick(self.time))

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds):
        self.time += seconds
        self.synced = False

    @invariant()
    def every_operation_first_ends_the_leases_due(self):
        if self.synced:
            for host, (token, deadline, ticket) in self.holders.items():
                assert deadline is None or deadline > self.time, f"{host} holds after its lease ended"

    @invariant()
    def nobody_waits_for_a_free_slot(self):
        if self.synced and self.queue:
            assert len(self.holders) == self.maxlocks


class BackendMachine(PoolModel):
    """InMemoryBackend on a Clock: timers end leases, waits are Deferreds."""

    @initialize(maxlocks=st.sampled_from(MAXLOCKS), expire=st.sampled_from(EXPIRES))
    def start(self, maxlocks, expire):
        self.setup_model(maxlocks, expire)
        self.clock = Clock()
        self.clock.advance(T0)
        self.backend = InMemoryBackend({"p": PoolSpec("p", expire=expire, maxlocks=maxlocks)}, self.clock,
                                       clock=self.clock.seconds)
        self.backend.observers.append(self.observe)
        self.backend.startService()
        self.waits = {}  # request number -> (host, Deferred), still open
        # request number -> (host, result, the host's token in the model at
        # the answer, the request's ticket)
        self.outcomes = {}
        self.serial = 0

    def now(self):
        return self.clock.seconds()

    def end_of_step(self, releasing=None):
        # One clock advance may run several steps (a timeout, then an
        # expiry): each /wait's answer is checked as it arrives instead.
        self.told_yes = []

    def state(self):
        return self.backend._pools["p"].state

    def result(self, answer):
        assert not isinstance(answer, Deferred), "the in-memory backend answers at once"
        self.end_of_step()
        return answer

    @rule(host=st.sampled_from(HOSTS))
    def get(self, host):
        held = host in self.holders
        hold = self.result(self.backend.get("p", host[0], "", host[1]))
        if held:
            assert isinstance(hold, Hold), "a holder's /get must renew"
        if isinstance(hold, Hold):
            assert self.holders[host][0] == hold.token

    @rule(host=st.sampled_from(HOSTS), timeout=st.none() | st.sampled_from(STEPS))
    def wait(self, host, timeout):
        self.serial += 1
        number = self.serial
        self.last_ticket = None
        d = self.backend.wait("p", host[0], "", host[1])
        ticket = self.last_ticket  # queued, granted or renewed: announced at once
        assert ticket is not None
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        self.waits[number] = (host, d)

        def answered(result):
            self.outcomes[number] = (host, result, self.holders.get(host, [None])[0], ticket)
            self.waits.pop(number, None)

        d.addBoth(answered)
        self.end_of_step()

    @rule(host=st.sampled_from(HOSTS))
    def release(self, host):
        held = host in self.holders
        assert self.result(self.backend.release("p", host[0], host[1])) is held

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def renew(self, data):
        host = data.draw(st.sampled_from(sorted(self.holders)))
        token = self.holders[host][0]
        hold = self.result(self.backend.get("p", host[0], "", host[1]))
        assert isinstance(hold, Hold) and hold.token == token
        if self.expire:
            assert hold.expires_at == self.clock.seconds() + self.expire

    @precondition(lambda self: self.waits)
    @rule(data=st.data())
    def leave(self, data):
        number = data.draw(st.sampled_from(sorted(self.waits)))
        _host, d = self.waits[number]
        d.cancel()
        self.end_of_step()
        assert self.outcomes[number][1].check(CancelledError)

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds):
        self.clock.advance(seconds)
        self.end_of_step()

    @invariant()
    def no_hold_outlives_its_lease(self):
        now = self.clock.seconds()
        for host, (token, deadline, ticket) in self.holders.items():
            assert deadline is None or deadline > now, f"{host} still holds after its lease ended"

    @invariant()
    def nobody_waits_for_a_free_slot(self):
        if self.queue:
            assert len(self.holders) == self.maxlocks

    @invariant()
    def every_open_wait_has_its_place_in_the_queue(self):
        assert len(self.waits) == len(self.queue)

    @invariant()
    def every_answer_is_right(self):
        for host, result, token, ticket in self.outcomes.values():
            if hasattr(result, "check"):
                assert result.check(CancelledError, TimeoutError), result
                assert ticket not in self.granted_tickets, "a /wait was granted as it left"
            else:
                assert result.kind in (GRANTED, RENEWED)
                assert holder(result) == host, "a grant answered another host's /wait"
                assert result.token == token, "a /wait was answered with a token it does not hold"

    def teardown(self):
        if hasattr(self, "backend"):
            self.backend.stopService()


RulesMachine.TestCase.settings = SETTINGS
BackendMachine.TestCase.settings = SETTINGS
test_the_pool_rules_keep_every_guarantee = RulesMachine.TestCase
test_the_in_memory_backend_keeps_every_guarantee = BackendMachine.TestCase
