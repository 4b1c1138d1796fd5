"""The pool rules (distributex.pool), pure: no reactor, no HTTP, time passed in.

Every guarantee of CONTRACT.md section 3 is stated here on the state
machine that both backends share.
"""


import pytest

from distributex.config import PoolSpec
from distributex.pool import (
    EXPIRED,
    GRANTED,
    LAPSED,
    LEFT,
    QUEUED,
    RELEASED,
    RENEWED,
    Pool,
    PoolState,
    Ticket,
)
from distributex.token import TOKEN_RESOLUTION, next_token

pytestmark = pytest.mark.timeout(60)

#: A realistic wall-clock time, so tokens look like the real ones.
T0 = 1_700_000_000.0


def make_pool(expire=300.0, maxlocks=1, state=None, name="pool1"):
    return Pool(PoolSpec(name, expire=expire, maxlocks=maxlocks), state)


def ticket(tid, host, now=T0, label=""):
    return Ticket(tid, host, label, now)


def kinds(step):
    return [(e.kind, e.host) for e in step.events]


def holders(pool):
    return sorted(host if not session else (host, session) for host, session in pool.state.holders)


def queue(pool):
    return [t.host for t in pool.state.queue.values()]


# -- safety --------------------------------------------------------------------


def test_a_free_pool_grants_a_get():
    pool = make_pool()
    step = pool.get("a", "", T0)
    assert step.hold is not None and step.hold.host == "a"
    assert kinds(step) == [(GRANTED, "a")]


def test_a_held_mutex_refuses_a_get_from_another_host():
    pool = make_pool()
    pool.get("a", "", T0)
    step = pool.get("b", "", T0 + 1)
    assert step.hold is None
    assert not step.changed
    assert holders(pool) == ["a"]


def test_a_held_mutex_queues_a_waiter():
    pool = make_pool()
    pool.get("a", "", T0)
    step = pool.wait(ticket("t1", "b"), T0 + 1)
    assert step.hold is None
    assert kinds(step) == [(QUEUED, "b")]
    assert queue(pool) == ["b"]


def test_a_free_pool_grants_a_waiter_at_once_without_queueing_it():
    pool = make_pool()
    step = pool.wait(ticket("t1", "a"), T0)
    assert step.hold is not None and step.hold.ticket == "t1"
    assert kinds(step) == [(GRANTED, "a")]
    assert queue(pool) == []


def test_a_semaphore_grants_up_to_maxlocks_distinct_hosts():
    pool = make_pool(maxlocks=3)
    answers = [pool.get(h, "", T0).hold is not None for h in ("a", "b", "c", "d")]
    assert answers == [True, True, True, False]
    assert holders(pool) == ["a", "b", "c"]


def test_a_semaphore_queues_waiters_beyond_maxlocks():
    pool = make_pool(maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0)
    step = pool.wait(ticket("t1", "c"), T0)
    assert kinds(step) == [(QUEUED, "c")]
    assert holders(pool) == ["a", "b"]


def test_a_semaphore_grants_the_head_waiter_when_any_holder_releases():
    pool = make_pool(maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0)
    pool.wait(ticket("t1", "c"), T0)
    pool.wait(ticket("t2", "d"), T0)
    step = pool.release("b", T0 + 1)
    assert kinds(step) == [(RELEASED, "b"), (GRANTED, "c")]
    assert holders(pool) == ["a", "c"]
    assert queue(pool) == ["d"]


# -- fairness: FIFO, no barging -------------------------------------------------


def test_waiters_are_granted_in_the_order_they_queued():
    pool = make_pool()
    pool.get("holder", "", T0)
    for i, host in enumerate(["w1", "w2", "w3"]):
        pool.wait(ticket(f"t{i}", host), T0 + i)
    granted = []
    current = "holder"
    for i in range(3):
        step = pool.release(current, T0 + 10 + i)
        (grant,) = [e for e in step.events if e.kind == GRANTED]
        granted.append(grant.host)
        current = grant.host
    assert granted == ["w1", "w2", "w3"]


def test_a_release_hands_the_slot_to_the_head_of_the_queue_in_the_same_step():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0)
    step = pool.release("a", T0 + 1)
    assert kinds(step) == [(RELEASED, "a"), (GRANTED, "b")]
    assert step.events[1].ticket == "t1"
    assert holders(pool) == ["b"]


def test_a_get_does_not_overtake_a_waiter_after_an_unnoticed_expiry():
    # The lease of "a" ended at T0+300 but nothing ran since: the waiter,
    # not the newcomer, gets the slot.
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w"), T0 + 1)
    step = pool.get("newcomer", "", T0 + 400)
    assert step.hold is None
    assert kinds(step) == [(EXPIRED, "a"), (GRANTED, "w")]
    assert holders(pool) == ["w"]


def test_a_wait_does_not_overtake_a_waiter_after_an_unnoticed_expiry():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0 + 1)
    step = pool.wait(ticket("t2", "w2"), T0 + 400)
    assert step.hold is None
    assert kinds(step) == [(EXPIRED, "a"), (GRANTED, "w1"), (QUEUED, "w2")]


def test_a_get_does_not_overtake_a_waiter_when_a_block_lifts():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    pool.wait(ticket("t1", "w"), T0)
    step = pool.get("newcomer", "", T0 + 10)
    assert step.hold is None
    assert holders(pool) == ["w"]


def test_a_get_is_refused_while_a_waiter_queues_for_a_semaphore():
    pool = make_pool(maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0)
    pool.wait(ticket("t1", "w"), T0)
    pool.release("a", T0 + 1)  # w takes the freed slot
    assert pool.get("c", "", T0 + 2).hold is None
    assert holders(pool) == ["b", "w"]


# -- leases: expiry on time ----------------------------------------------------


def test_a_hold_lasts_until_just_before_expire():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    step = pool.tick(T0 + 299.999)
    assert not step.changed
    assert holders(pool) == ["a"]


def test_a_hold_ends_exactly_expire_seconds_after_its_grant():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    step = pool.tick(T0 + 300)
    assert kinds(step) == [(EXPIRED, "a")]
    assert holders(pool) == []


def test_a_fractional_expire_is_honoured():
    pool = make_pool(expire=0.5)
    pool.get("a", "", T0)
    assert not pool.tick(T0 + 0.49).changed
    assert kinds(pool.tick(T0 + 0.5)) == [(EXPIRED, "a")]


def test_an_expiry_hands_the_slot_to_the_next_waiter():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0 + 1)
    step = pool.tick(T0 + 300)
    assert kinds(step) == [(EXPIRED, "a"), (GRANTED, "b")]
    assert holders(pool) == ["b"]


def test_a_lease_of_zero_never_expires():
    pool = make_pool(expire=0)
    step = pool.get("a", "", T0)
    assert step.hold.expires_at is None
    assert not pool.tick(T0 + 10 ** 9).changed
    assert holders(pool) == ["a"]
    assert pool.next_deadline() is None


def test_next_deadline_is_the_earliest_lease_end():
    pool = make_pool(expire=300, maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0 + 100)
    assert pool.next_deadline() == T0 + 300
    pool.release("a", T0 + 150)
    assert pool.next_deadline() == T0 + 400


def test_next_deadline_is_none_for_an_idle_pool():
    assert make_pool().next_deadline() is None


def test_expired_holds_of_a_semaphore_end_together_and_waiters_fill_them_in_order():
    pool = make_pool(expire=10, maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    pool.wait(ticket("t2", "w2"), T0)
    pool.wait(ticket("t3", "w3"), T0)
    step = pool.tick(T0 + 10)
    assert [k for k, _ in kinds(step)] == [EXPIRED, EXPIRED, GRANTED, GRANTED]
    assert holders(pool) == ["w1", "w2"]
    assert queue(pool) == ["w3"]


# -- expiry racing a release ---------------------------------------------------


def test_a_release_at_the_moment_of_expiry_grants_the_next_waiter_once():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0 + 1)
    pool.wait(ticket("t2", "c"), T0 + 2)
    step = pool.release("a", T0 + 300)
    assert kinds(step) == [(EXPIRED, "a"), (GRANTED, "b")]
    assert holders(pool) == ["b"]
    assert queue(pool) == ["c"]


def test_a_late_release_by_an_expired_holder_does_not_end_the_next_holders_hold():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0 + 1)
    pool.tick(T0 + 300)  # a expires, b holds
    step = pool.release("a", T0 + 301)
    assert not step.changed
    assert holders(pool) == ["b"]


def test_a_late_release_by_an_expired_holder_reports_nothing_released():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    step = pool.release("a", T0 + 500)
    assert kinds(step) == [(EXPIRED, "a")]
    assert RELEASED not in [e.kind for e in step.events]


def test_releasing_what_you_do_not_hold_changes_nothing():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0)
    step = pool.release("stranger", T0 + 1)
    assert not step.changed
    assert holders(pool) == ["a"]
    assert queue(pool) == ["b"]


def test_a_queued_host_releasing_keeps_its_place():
    # Release ends a hold, not a place in the queue (that is leave's job).
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0)
    pool.release("b", T0 + 1)
    assert queue(pool) == ["b"]


# -- renewal ---------------------------------------------------------------------


def test_a_get_by_the_holder_renews_its_lease():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    step = pool.get("a", "", T0 + 200)
    assert kinds(step) == [(RENEWED, "a")]
    assert step.hold.expires_at == T0 + 500


def test_a_renewal_keeps_the_token():
    pool = make_pool(expire=300)
    first = pool.get("a", "", T0).hold.token
    step = pool.get("a", "", T0 + 200)
    assert step.hold.token == first
    assert step.events[0].token == first


def test_a_renewed_hold_outlives_its_first_deadline():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    pool.get("a", "", T0 + 200)
    assert not pool.tick(T0 + 300).changed
    assert kinds(pool.tick(T0 + 500)) == [(EXPIRED, "a")]


def test_a_renewal_keeps_the_grant_time():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    assert pool.get("a", "", T0 + 200).hold.granted_at == T0


def test_a_renewal_with_a_label_replaces_the_label():
    pool = make_pool()
    pool.get("a", "backup", T0)
    assert pool.get("a", "restore", T0 + 1).hold.label == "restore"


def test_a_renewal_without_a_label_keeps_the_label():
    pool = make_pool()
    pool.get("a", "backup", T0)
    assert pool.get("a", "", T0 + 1).hold.label == "backup"


def test_a_renewal_after_the_lease_ended_is_a_new_grant_with_a_new_token():
    pool = make_pool(expire=300)
    first = pool.get("a", "", T0).hold.token
    step = pool.get("a", "", T0 + 301)
    assert kinds(step) == [(EXPIRED, "a"), (GRANTED, "a")]
    assert step.hold.token > first


# -- re-entrancy ---------------------------------------------------------------


def test_a_holder_asking_again_takes_no_second_slot():
    pool = make_pool(maxlocks=2)
    pool.get("a", "", T0)
    pool.get("a", "", T0 + 1)
    assert pool.get("b", "", T0 + 2).hold is not None
    assert pool.get("c", "", T0 + 3).hold is None


def test_a_holders_wait_is_answered_at_once_with_its_own_token():
    pool = make_pool()
    token = pool.get("a", "", T0).hold.token
    step = pool.wait(ticket("t1", "a"), T0 + 1)
    assert step.hold is not None and step.hold.token == token
    assert kinds(step) == [(RENEWED, "a")]
    assert step.events[0].ticket == "t1"
    assert queue(pool) == []


def test_a_holders_wait_does_not_queue_behind_waiters():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "b"), T0)
    step = pool.wait(ticket("t2", "a"), T0 + 1)
    assert kinds(step) == [(RENEWED, "a")]
    assert queue(pool) == ["b"]


def test_a_holders_wait_renews_its_lease():
    pool = make_pool(expire=300)
    pool.get("a", "", T0)
    step = pool.wait(ticket("t1", "a"), T0 + 200)
    assert step.hold.expires_at == T0 + 500


def test_a_host_queued_twice_is_granted_once_and_its_second_place_renews():
    pool = make_pool(maxlocks=2)
    pool.get("a", "", T0)
    pool.get("b", "", T0)
    pool.wait(ticket("t1", "c"), T0)
    pool.wait(ticket("t2", "c"), T0)
    pool.wait(ticket("t3", "d"), T0)
    step = pool.release("a", T0 + 1)
    assert [(e.kind, e.host, e.ticket) for e in step.events] == [
        (RELEASED, "a", None), (GRANTED, "c", "t1"), (RENEWED, "c", "t2")]
    assert holders(pool) == ["b", "c"]
    assert queue(pool) == ["d"]


# -- a waiter leaving ----------------------------------------------------------


def test_a_waiter_leaving_mid_queue_keeps_the_order_of_the_others():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    pool.wait(ticket("t2", "w2"), T0)
    pool.wait(ticket("t3", "w3"), T0)
    step = pool.leave("t2", T0 + 1)
    assert kinds(step) == [(LEFT, "w2")]
    assert queue(pool) == ["w1", "w3"]
    assert [e.host for e in pool.release("a", T0 + 2).events if e.kind == GRANTED] == ["w1"]
    assert [e.host for e in pool.release("w1", T0 + 3).events if e.kind == GRANTED] == ["w3"]


def test_a_waiter_that_left_is_never_granted():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    pool.leave("t1", T0 + 1)
    step = pool.release("a", T0 + 2)
    assert kinds(step) == [(RELEASED, "a")]
    assert holders(pool) == []


def test_leaving_after_the_grant_releases_the_hold_and_grants_the_next():
    # The grant raced the waiter's departure: its connection has gone, so
    # the hold it can no longer use is released at once.
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    pool.wait(ticket("t2", "w2"), T0)
    pool.release("a", T0 + 1)  # granted to w1 (ticket t1)
    step = pool.leave("t1", T0 + 1)
    assert kinds(step) == [(RELEASED, "w1"), (GRANTED, "w2")]
    assert holders(pool) == ["w2"]


def test_a_waiter_leaving_after_an_unnoticed_expiry_is_not_granted_on_its_way_out():
    pool = make_pool(expire=10)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    pool.wait(ticket("t2", "w2"), T0)
    step = pool.leave("t1", T0 + 10)
    assert [(e.kind, e.host) for e in step.events if e.kind in (GRANTED, RELEASED)] == [(GRANTED, "w2")]
    assert holders(pool) == ["w2"]


def test_a_wait_answered_yes_keeps_its_hold_when_an_earlier_wait_of_its_host_leaves():
    # w holds two places; its first /wait leaves (a timeout) just after the
    # lease of "a" ended, before anything noticed. The second /wait is told
    # YES (renewed): that hold must still be there afterwards, or w works
    # on the resource while the pool is free for anyone.
    pool = make_pool(expire=10)
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w"), T0)
    pool.wait(ticket("t2", "w"), T0)
    step = pool.leave("t1", T0 + 10)
    told_yes = [e for e in step.events if e.kind in (GRANTED, RENEWED) and e.ticket == "t2"]
    assert told_yes, "the second /wait of w must be granted"
    assert holders(pool) == ["w"]


def test_leaving_with_an_unknown_ticket_changes_nothing():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "w1"), T0)
    assert not pool.leave("nope", T0 + 1).changed
    assert holders(pool) == ["a"]
    assert queue(pool) == ["w1"]


def test_a_departed_renewal_does_not_end_the_hold_it_renewed():
    # "a" holds through /get; its /wait renewed the hold and then went away:
    # the hold is not that /wait's grant, so it stays.
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(ticket("t1", "a"), T0 + 1)
    assert not pool.leave("t1", T0 + 2).changed
    assert holders(pool) == ["a"]


def test_prune_drops_the_places_of_dead_servers():
    pool = make_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("t1", "w1", "", T0, server="dead"), T0)
    pool.wait(Ticket("t2", "w2", "", T0, server="alive"), T0)
    step = pool.prune(lambda t: t.server == "dead", T0 + 1)
    assert kinds(step) == [(LEFT, "w1")]
    assert queue(pool) == ["w2"]


# -- fencing tokens -------------------------------------------------------------


def test_a_token_is_a_positive_integer():
    token = make_pool().get("a", "", 0.0).hold.token
    assert isinstance(token, int) and token > 0


def test_tokens_increase_strictly_with_every_grant_at_the_same_instant():
    pool = make_pool()
    tokens = []
    for i in range(100):
        tokens.append(pool.get(f"h{i}", "", T0).hold.token)
        pool.release(f"h{i}", T0)
    assert all(b > a for a, b in zip(tokens, tokens[1:]))


def test_a_token_is_at_least_the_grant_time_in_microseconds():
    token = make_pool().get("a", "", T0).hold.token
    assert token >= int(T0 * TOKEN_RESOLUTION)


def test_a_fresh_pool_state_at_a_later_time_gives_a_larger_token():
    # A restart forgets every token; the clock floor keeps them growing,
    # even after a burst of grants in one instant before the restart.
    before = make_pool()
    last = 0
    for i in range(1000):
        last = before.get(f"h{i}", "", T0).hold.token
        before.release(f"h{i}", T0)
    after = make_pool()
    assert after.get("a", "", T0 + 1).hold.token > last


def test_tokens_do_not_go_backwards_when_the_clock_steps_back():
    pool = make_pool()
    first = pool.get("a", "", T0).hold.token
    pool.release("a", T0)
    assert pool.get("b", "", T0 - 3600).hold.token > first


def test_tokens_continue_from_a_stored_state_that_is_ahead_of_the_clock():
    pool = make_pool(state=PoolState(last_token=10 ** 17))
    assert pool.get("a", "", T0).hold.token == 10 ** 17 + 1


def test_next_token_is_one_more_than_the_last_when_the_clock_is_behind():
    assert next_token(5_000_000, 1.0) == 5_000_001


def test_next_token_jumps_to_the_clock_floor_when_the_clock_is_ahead():
    assert next_token(7, 2.5) == 2_500_000


# -- blocked_until -------------------------------------------------------------


def test_a_blocked_pool_refuses_a_get():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    assert pool.get("a", "", T0).hold is None
    assert holders(pool) == []


def test_a_blocked_pool_queues_a_waiter():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    step = pool.wait(ticket("t1", "a"), T0)
    assert kinds(step) == [(QUEUED, "a")]


def test_a_waiter_is_granted_when_the_block_lifts():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    pool.wait(ticket("t1", "a"), T0)
    assert not pool.tick(T0 + 9.9).changed
    assert kinds(pool.tick(T0 + 10)) == [(GRANTED, "a")]


def test_a_get_is_granted_once_the_block_has_lifted():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    assert pool.get("a", "", T0 + 10).hold is not None


def test_next_deadline_is_the_block_end_while_someone_waits():
    pool = make_pool(state=PoolState(blocked_until=T0 + 10))
    assert pool.next_deadline() is None
    pool.wait(ticket("t1", "a"), T0)
    assert pool.next_deadline() == T0 + 10


# -- events ----------------------------------------------------------------------


def test_a_grant_event_names_pool_host_label_token_ticket_and_time():
    pool = make_pool(name="backups")
    step = pool.wait(ticket("t1", "web3", label="nightly"), T0)
    (event,) = step.events
    assert (event.kind, event.pool, event.host, event.label, event.token, event.ticket, event.at) == (
        GRANTED, "backups", "web3", "nightly", step.hold.token, "t1", T0)


def test_a_queued_event_carries_no_token():
    pool = make_pool()
    pool.get("a", "", T0)
    (event,) = pool.wait(ticket("t1", "b"), T0).events
    assert event.kind == QUEUED and event.token is None and event.ticket == "t1"


def test_a_release_event_carries_the_released_token():
    pool = make_pool()
    token = pool.get("a", "", T0).hold.token
    (event,) = pool.release("a", T0 + 1).events
    assert (event.kind, event.token) == (RELEASED, token)


def test_prune_drops_a_dead_servers_place_before_handing_on_an_expired_slot():
    # The slot of an expired hold must go to the first live waiter, not to a
    # ticket whose server has died (nobody would answer that grant, and the
    # slot would stay taken for a whole lease).
    pool = make_pool(expire=10)
    pool.get("a", "", T0)
    pool.wait(Ticket("t1", "w1", "", T0, server="dead"), T0)
    pool.wait(Ticket("t2", "w2", "", T0, server="alive"), T0)
    pool.prune(lambda t: t.server == "dead", T0 + 10)
    assert holders(pool) == ["w2"]
    assert queue(pool) == []


# -- answers owed to other servers' tickets ------------------------------------------


def _shared_pool(expire=10.0):
    return Pool(PoolSpec("p", expire=expire), wall=lambda: T0)


def test_an_answer_taken_at_delivery_renews_the_hold_from_then():
    pool = _shared_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("s2.1", "b", "", T0, "s2"), T0)
    pool.release("a", T0 + 1)  # granted to b by this server; s2 will tell b
    answers = pool.take_answers("s2", T0 + 5)
    assert [a.kind for a in answers.values()] == [GRANTED]
    (hold,) = pool.state.holders.values()
    assert hold.expires_at == T0 + 5 + 10  # a full lease from the delivery


def test_a_grant_that_lapsed_before_it_was_delivered_comes_back_lapsed():
    pool = _shared_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("s2.1", "b", "", T0, "s2"), T0)
    pool.release("a", T0 + 1)
    pool.tick(T0 + 12)  # b's lease ran out: its server was paused
    answers = pool.take_answers("s2", T0 + 12)
    assert [a.kind for a in answers.values()] == [LAPSED]
    assert pool.state.answers == {}


def test_a_grant_taken_for_a_waiter_that_had_gone_is_given_back_to_the_next():
    # b hung up while its server's transaction was taking its grant: the
    # leave that follows finds a hold renewed by the take, not by b.
    pool = _shared_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("s2.1", "b", "", T0, "s2"), T0)
    pool.wait(Ticket("s3.1", "c", "", T0, "s3"), T0)
    pool.release("a", T0 + 1)
    pool.take_answers("s2", T0 + 2)
    (hold,) = pool.state.holders.values()
    assert not pool.leave("s2.1", T0 + 3).changed
    step = pool.give_back("s2.1", hold.token, hold.renewals, T0 + 3)
    assert kinds(step) == [(RELEASED, "b"), (GRANTED, "c")]


def test_a_taken_grant_renewed_since_by_its_holder_is_not_given_back():
    pool = _shared_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("s2.1", "b", "", T0, "s2"), T0)
    pool.release("a", T0 + 1)
    pool.take_answers("s2", T0 + 2)
    (hold,) = pool.state.holders.values()
    taken = hold.renewals
    pool.get("b", "", T0 + 3)  # b asked again through another server: YES
    assert not pool.give_back("s2.1", hold.token, taken, T0 + 4).changed
    assert holders(pool) == ["b"]


def test_a_departed_waiters_grant_is_not_given_back_once_its_holder_renewed_it():
    # The waiter's server died before telling it; the client asked again
    # (the same session, through another server) and was told YES: the
    # dead server's ticket leaving must not release what is now known held.
    pool = _shared_pool()
    pool.get("a", "", T0)
    pool.wait(Ticket("s2.1", "b", "", T0, "s2", "sess"), T0)
    pool.release("a", T0 + 1)  # granted to b's ticket, owed to s2
    renewed = pool.get("b", "", T0 + 2, "s3", "sess")  # b asks again elsewhere: YES, renewed
    assert renewed.hold is not None
    pool.leave("s2.1", T0 + 3)  # s2's ticket goes (its server died)
    assert [h.host for h in pool.state.holders.values()] == ["b"]
