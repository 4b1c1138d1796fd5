"""InMemoryBackend on a twisted.internet.task.Clock: event-driven handoffs,
leases that end on time with no request, waits that leave, shutdown."""

import pytest
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from distributex.backend import ShuttingDown
from distributex.backend.memory import InMemoryBackend
from distributex.config import PoolSpec
from distributex.pool import EXPIRED, GRANTED, LEFT, QUEUED, RELEASED, RENEWED

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0

# successResultOf / failureResultOf / assertNoResult, without a test case.
_sync = SynchronousTestCase()
result_of = _sync.successResultOf
failure_of = _sync.failureResultOf
no_result = _sync.assertNoResult


class World:
    """A backend with one pool on a Clock, and the events it announced."""

    def __init__(self, expire=300.0, maxlocks=1):
        self.clock = Clock()
        self.clock.advance(T0)
        self.backend = InMemoryBackend({"p": PoolSpec("p", expire=expire, maxlocks=maxlocks)}, self.clock,
                                       clock=self.clock.seconds)
        self.events = []
        self.backend.observers.append(self.events.append)
        self.backend.startService()

    # The in-memory backend answers get and release at once, with no Deferred.
    def get(self, host, label=""):
        return self.backend.get("p", host, label)

    def release(self, host):
        return self.backend.release("p", host)

    def wait(self, host, label=""):
        return self.backend.wait("p", host, label)

    def kinds(self):
        return [(e.kind, e.host) for e in self.events]

    def state(self):
        ((_spec, state, _now),) = result_of(self.backend.status(["p"]))
        return state

    def holders(self):
        return sorted(host for host, _ in self.state().holders)

    def waiters(self):
        return [t.host for t in self.state().queue.values()]


# -- get, release, wait ----------------------------------------------------------


def test_a_get_on_a_free_pool_fires_with_the_hold():
    world = World()
    hold = world.get("a", "nightly")
    assert (hold.host, hold.label, hold.granted_at, hold.expires_at) == ("a", "nightly", T0, T0 + 300)


def test_a_get_on_a_held_pool_fires_with_none():
    world = World()
    world.get("a")
    assert world.get("b") == "busy"


def test_a_get_by_the_holder_fires_with_the_same_token():
    world = World()
    token = world.get("a").token
    world.clock.advance(10)
    assert world.get("a").token == token


def test_a_release_fires_true_for_the_holder():
    world = World()
    world.get("a")
    assert world.release("a") is True


def test_a_release_fires_false_for_a_host_that_does_not_hold():
    world = World()
    world.get("a")
    assert world.release("b") is False
    assert world.holders() == ["a"]


def test_a_wait_on_a_free_pool_fires_at_once_with_the_grant():
    world = World()
    event = result_of(world.wait("a", "nightly"))
    assert (event.kind, event.host, event.label) == (GRANTED, "a", "nightly")


def test_a_wait_on_a_held_pool_does_not_fire():
    world = World()
    world.get("a")
    no_result(world.wait("b"))
    assert world.waiters() == ["b"]


def test_a_release_hands_over_to_the_next_waiter_in_the_same_call():
    world = World()
    world.get("a")
    waiting = world.wait("b")
    world.release("a")
    event = result_of(waiting)
    assert (event.kind, event.host) == (GRANTED, "b")
    assert world.holders() == ["b"]


def test_waiters_are_answered_in_the_order_they_queued():
    world = World()
    world.get("a")
    waits = {host: world.wait(host) for host in ("w1", "w2", "w3")}
    answered = []
    current = "a"
    for _ in range(3):
        world.release(current)
        fired = [h for h, d in waits.items() if d.called and h not in answered]
        assert len(fired) == 1
        answered.append(fired[0])
        current = fired[0]
    assert answered == ["w1", "w2", "w3"]


def test_a_holders_wait_fires_at_once_with_its_token():
    world = World()
    token = world.get("a").token
    event = result_of(world.wait("a"))
    assert (event.kind, event.token) == (RENEWED, token)


def test_waits_on_a_semaphore_fire_for_maxlocks_hosts():
    world = World(maxlocks=2)
    waits = [world.wait(h) for h in ("a", "b", "c")]
    assert [d.called for d in waits] == [True, True, False]


def test_local_waiters_counts_open_waits():
    world = World()
    world.get("a")
    world.wait("b")
    world.wait("c")
    assert world.backend.local_waiters() == 2
    world.release("a")
    assert world.backend.local_waiters() == 1


# -- leases end on time, with no request ---------------------------------------------


def test_a_lease_lasts_until_just_before_expire():
    world = World(expire=300)
    world.get("a")
    world.clock.advance(299.5)
    assert EXPIRED not in [k for k, _ in world.kinds()]


def test_a_lease_ends_exactly_at_expire_with_no_request():
    world = World(expire=300)
    world.get("a")
    world.clock.advance(299.5)
    world.clock.advance(0.5)
    (expired,) = [e for e in world.events if e.kind == EXPIRED]
    assert (expired.host, expired.at) == ("a", T0 + 300)


def test_an_expiry_grants_the_next_waiter_with_no_request():
    world = World(expire=300)
    world.get("a")
    world.clock.advance(1)
    waiting = world.wait("b")
    world.clock.advance(298.5)
    no_result(waiting)
    world.clock.advance(0.5)
    event = result_of(waiting)
    assert (event.kind, event.host, event.at) == (GRANTED, "b", T0 + 300)


def test_a_fractional_lease_ends_on_time():
    world = World(expire=0.3)
    world.clock.advance(0.1)
    world.get("a")
    waiting = world.wait("b")
    world.clock.advance(0.3)
    assert result_of(waiting).host == "b"


def test_a_renewal_postpones_the_end_of_the_lease():
    world = World(expire=300)
    world.get("a")
    world.clock.advance(200)
    world.get("a")
    world.clock.advance(299)
    assert world.holders() == ["a"]
    world.clock.advance(1)
    assert [k for k, _ in world.kinds()].count(EXPIRED) == 1
    assert world.events[-1].at == T0 + 500


def test_a_stale_timer_does_not_end_the_next_holders_lease_early():
    world = World(expire=300)
    world.get("a")
    waiting = world.wait("b")
    world.clock.advance(100)
    world.release("a")  # b is granted at T0+100, its lease ends at T0+400
    result_of(waiting)
    world.clock.advance(200)  # T0+300: a's deadline
    assert world.holders() == ["b"]
    assert EXPIRED not in [k for k, _ in world.kinds()]


def test_each_holder_of_a_semaphore_expires_at_its_own_time():
    world = World(expire=100, maxlocks=2)
    world.get("a")
    world.clock.advance(30)
    world.get("b")
    world.clock.advance(70)
    assert [(e.host, e.at) for e in world.events if e.kind == EXPIRED] == [("a", T0 + 100)]
    world.clock.advance(30)
    assert [(e.host, e.at) for e in world.events if e.kind == EXPIRED] == [("a", T0 + 100), ("b", T0 + 130)]


def test_a_pool_with_expire_zero_sets_no_timer():
    world = World(expire=0)
    world.get("a")
    world.wait("b")
    assert world.clock.getDelayedCalls() == []


def test_an_idle_pool_sets_no_timer():
    world = World()
    world.get("a")
    world.release("a")
    world.clock.advance(300)
    assert world.clock.getDelayedCalls() == []


# -- waits that leave -------------------------------------------------------------------


def test_cancelling_a_wait_fails_it_with_cancelled_error():
    world = World()
    world.get("a")
    waiting = world.wait("b")
    waiting.cancel()
    failure_of(waiting, CancelledError)


def test_cancelling_a_wait_leaves_the_queue_at_once():
    world = World()
    world.get("a")
    waiting = world.wait("b")
    world.wait("c")
    waiting.cancel()
    assert (LEFT, "b") in world.kinds()
    assert world.waiters() == ["c"]


def test_cancelling_a_wait_mid_queue_passes_its_turn_to_the_next():
    world = World()
    world.get("a")
    w1, w2, w3 = world.wait("w1"), world.wait("w2"), world.wait("w3")
    w2.cancel()
    failure_of(w2, CancelledError)
    world.release("a")
    assert result_of(w1).host == "w1"
    no_result(w3)
    world.release("w1")
    assert result_of(w3).host == "w3"


def test_cancelling_a_granted_wait_keeps_the_hold():
    world = World()
    waiting = world.wait("a")
    result_of(waiting)
    waiting.cancel()
    assert world.holders() == ["a"]


def test_a_wait_with_add_timeout_fails_with_timeout_error_when_it_passes():
    world = World()
    world.get("a")
    waiting = world.wait("b").addTimeout(5, world.clock)
    world.clock.advance(4.9)
    no_result(waiting)
    world.clock.advance(0.1)
    failure_of(waiting, TimeoutError)


def test_a_wait_that_timed_out_has_left_the_queue():
    world = World()
    world.get("a")
    world.wait("b").addTimeout(5, world.clock).addErrback(lambda f: None)
    world.clock.advance(5)
    assert world.waiters() == []
    world.release("a")
    assert world.holders() == []


def test_a_host_told_yes_holds_even_when_its_other_wait_times_out_in_the_same_instant():
    # Found by the stateful test: h1 queues twice, the first /wait with a
    # timeout; the clock jumps past both the timeout and the lease of h0.
    # The second /wait is answered YES; h1 must then hold the pool.
    world = World(expire=0.5)
    world.get("h0")
    world.wait("h1").addTimeout(0.25, world.clock).addErrback(lambda f: None)
    second = world.wait("h1")
    world.clock.advance(0.5)
    assert result_of(second).host == "h1"
    assert world.holders() == ["h1"]


def test_a_wait_granted_before_its_timeout_keeps_the_hold_after_it():
    world = World()
    world.get("a")
    waiting = world.wait("b").addTimeout(5, world.clock)
    world.release("a")
    world.clock.advance(10)
    assert result_of(waiting).host == "b"
    assert world.holders() == ["b"]


def test_a_wait_with_a_zero_timeout_on_a_free_pool_is_granted():
    world = World()
    waiting = world.wait("a").addTimeout(0, world.clock)
    world.clock.advance(0)
    assert result_of(waiting).host == "a"


# -- observers ----------------------------------------------------------------------------


def test_observers_see_every_event_in_order():
    world = World(expire=100)
    world.get("a")
    world.wait("b")
    waiting = world.wait("c")
    waiting.cancel()
    world.release("a")
    world.clock.advance(100)
    assert world.kinds() == [
        (GRANTED, "a"), (QUEUED, "b"), (QUEUED, "c"), (LEFT, "c"),
        (RELEASED, "a"), (GRANTED, "b"), (EXPIRED, "b")]


def test_observers_hear_the_grant_before_the_waiter_is_answered():
    world = World()
    seen = []
    world.backend.observers.append(lambda e: seen.append(e.kind))
    world.get("a")
    world.wait("b").addCallback(lambda _: seen.append("answered"))
    world.release("a")
    assert seen[-3:] == [RELEASED, GRANTED, "answered"]


def test_a_waiter_that_releases_from_its_callback_hands_on_in_order():
    # The connection of w1 has gone when its grant arrives: it releases at
    # once, and the events of that release follow the ones that caused it.
    world = World()
    world.get("a")
    world.wait("w1").addCallback(lambda _: world.backend.release("p", "w1"))
    w2 = world.wait("w2")
    world.release("a")
    assert result_of(w2).host == "w2"
    assert world.kinds()[-4:] == [(RELEASED, "a"), (GRANTED, "w1"), (RELEASED, "w1"), (GRANTED, "w2")]


def test_every_observer_hears_every_event():
    world = World()
    other = []
    world.backend.observers.append(other.append)
    world.get("a")
    world.release("a")
    assert [e.kind for e in other] == [e.kind for e in world.events] == [GRANTED, RELEASED]


# -- status -------------------------------------------------------------------------------------


def test_status_reports_holders_and_waiters_in_queue_order():
    world = World(maxlocks=2)
    world.get("a")
    world.get("b")
    for host in ("w1", "w2", "w3"):
        world.wait(host)
    assert world.holders() == ["a", "b"]
    assert world.waiters() == ["w1", "w2", "w3"]


def test_status_reports_the_pool_spec_and_the_time():
    world = World(expire=42)
    ((spec, _state, now),) = result_of(world.backend.status(["p"]))
    assert (spec.name, spec.expire, now) == ("p", 42, T0)


# -- stopping --------------------------------------------------------------------------------------


def test_stop_service_answers_every_open_wait_with_shutting_down():
    world = World()
    world.get("a")
    waits = [world.wait(h) for h in ("b", "c", "d")]
    world.backend.stopService()
    for waiting in waits:
        failure_of(waiting, ShuttingDown)
    assert world.backend.local_waiters() == 0


def test_stop_service_cancels_the_expiry_timers():
    world = World(expire=300)
    world.get("a")
    assert world.clock.getDelayedCalls() != []
    world.backend.stopService()
    assert world.clock.getDelayedCalls() == []


def test_stop_service_leaves_answered_waits_alone():
    world = World()
    granted = world.wait("a")
    world.backend.stopService()
    assert result_of(granted).host == "a"
