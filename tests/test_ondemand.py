"""Pools on demand (contract section 2, ``pattern:`` entries) and queue
limits (``max_waiters``)."""

import pytest
from contract_helpers import assert_plain, get, holders, queued, release, wait_for, waiters
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from distributex.backend.memory import InMemoryBackend
from distributex.catalog import Catalog, PoolPattern, PoolSpec, overlap

pytestmark = pytest.mark.timeout(60)

JOBS = [{"name": "fixed", "expire": 300}, {"pattern": "job-*", "expire": 600}]


def test_a_name_matching_a_pattern_is_a_pool_from_its_first_request(start_server):
    server = start_server(JOBS)
    answer = get(server, "web1", pool="job-backup")
    assert_plain(answer, 200, b"YES")
    assert answer.headers["x-distributex-expire"] == "600"


def test_a_name_matching_no_pattern_is_still_unknown(start_server):
    server = start_server(JOBS)
    answer = get(server, "web1", pool="task-backup")
    assert_plain(answer, 404, b"INVALID")
    assert answer.headers["x-distributex-reason"] == "unknown pool 'task-backup'"


def test_status_lists_the_pools_on_demand_in_use_and_forgets_idle_ones(start_server):
    server = start_server(JOBS)
    get(server, "web1", pool="job-a")
    names = [p["name"] for p in server.call("status", format="json").json()["pools"]]
    assert names == ["fixed", "job-a"]
    release(server, "web1", pool="job-a")
    names = [p["name"] for p in server.call("status", format="json").json()["pools"]]
    assert names == ["fixed"]


def test_status_of_an_idle_pool_on_demand_shows_it_free(start_server):
    server = start_server(JOBS)
    (pool,) = server.call("status", pool="job-z", format="json").json()["pools"]
    assert (pool["name"], pool["holders"], pool["waiters"]) == ("job-z", [], [])


def test_a_pool_on_demand_queues_and_hands_over_like_any_pool(start_server):
    server = start_server(JOBS)
    get(server, "a", pool="job-q")
    waiting = wait_for(server, pool="job-q", host="b")
    queued(server, ["b"], pool="job-q")
    release(server, "a", pool="job-q")
    assert_plain(waiting.answer(timeout=5), 200, b"YES")
    assert holders(server, pool="job-q") == ["b"]


def test_a_held_pool_on_demand_survives_kill_9(start_server):
    server = start_server(JOBS)
    get(server, "a", pool="job-k")
    server.kill()
    server.start()
    assert holders(server, pool="job-k") == ["a"]
    assert_plain(get(server, "b", pool="job-k"), 200, b"NO")


def test_tokens_of_a_pool_on_demand_increase_after_it_was_forgotten(start_server):
    server = start_server(JOBS)
    first = int(get(server, "a", pool="job-t").headers["x-distributex-token"])
    release(server, "a", pool="job-t")  # idle: forgotten
    second = int(get(server, "a", pool="job-t").headers["x-distributex-token"])
    assert second > first


def test_idle_pools_on_demand_are_forgotten_so_memory_stays_bounded():
    clock = Clock()
    catalog = Catalog({"fixed": PoolSpec("fixed")}, [PoolPattern("job-*", PoolSpec("job-*", expire=60))])
    backend = InMemoryBackend(catalog, clock, clock=clock.seconds)
    for n in range(10_000):
        name = f"job-{n}"
        assert backend.get(name, "h", "") is not None
        assert backend.release(name, "h") is True
        if n % 1000 == 0:
            assert backend.wait(name, "h", "").called  # granted at once, held
            backend.release(name, "h")
    assert backend.active_pools() == ["fixed"]


# -- max_waiters -------------------------------------------------------------------


def test_a_wait_past_max_waiters_gets_429_and_changes_nothing(start_server, backend):
    server = start_server([{"name": "pool1", "expire": 300, "max_waiters": 2}], backend=backend)
    get(server, "holder")
    first, second = wait_for(server, host="w1"), wait_for(server, host="w2")
    queued(server, ["w1", "w2"])
    answer = server.call("wait", pool="pool1", host="w3", timeout="5")
    assert_plain(answer, 429, b"INVALID")
    assert answer.headers["x-distributex-reason"] == "the queue of pool 'pool1' is full (2 waiters)"
    assert waiters(server) == ["w1", "w2"] and holders(server) == ["holder"]
    release(server, "holder")
    assert first.answer(timeout=5).body == b"YES"
    second.hang_up()


def test_a_holders_wait_is_renewed_even_when_the_queue_is_full(start_server, backend):
    server = start_server([{"name": "pool1", "expire": 300, "max_waiters": 1}], backend=backend)
    get(server, "holder")
    other = wait_for(server, host="w1")
    queued(server, ["w1"])
    assert_plain(server.call("wait", pool="pool1", host="holder", timeout="1"), 200, b"YES")
    other.hang_up()


# -- the overlap of two patterns ------------------------------------------------------

PATTERN = st.text(alphabet="ab-*?", min_size=1, max_size=5).filter(lambda p: any(c in p for c in "*?"))


@settings(max_examples=300, deadline=None)
@given(PATTERN, PATTERN)
def test_overlap_finds_a_name_both_patterns_match_exactly_when_there_is_one(a, b):
    import fnmatch
    import itertools

    both = overlap(a, b)
    if both is not None:
        assert fnmatch.fnmatchcase(both, a) and fnmatch.fnmatchcase(both, b)
    else:
        # No witness: then no name of up to six of these letters matches
        # both either (a check by brute force, bounded).
        for length in range(7):
            for name in map("".join, itertools.product("ab-", repeat=length)):
                assert not (fnmatch.fnmatchcase(name, a) and fnmatch.fnmatchcase(name, b)), (a, b, name)
