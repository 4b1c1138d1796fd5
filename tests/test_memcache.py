"""The memcache backend: several distributex servers sharing one memcached
form one lock service. Real twistd servers, real memcached."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from servers import wait_until

pytestmark = pytest.mark.timeout(120)

MUTEX = [{"name": "p", "expire": 30}]


@pytest.fixture
def cluster(start_server, memcached):
    """cluster(n, pools, **config): n servers sharing one memcached namespace."""
    def start(n=2, pools=MUTEX, memcache=memcached, namespace=None, **config):
        namespace = namespace or f"c{time.monotonic_ns()}"
        return [start_server(pools, backend="memcache", memcache=memcache,
                             namespace=namespace, **config) for _ in range(n)]
    return start


class Waiter(threading.Thread):
    """A /wait in the background; .answer once it returns."""

    def __init__(self, server, host, pool="p", **params):
        super().__init__(daemon=True)
        self.server, self.host, self.pool, self.params = server, host, pool, params
        self.answer = None
        self.answered_at = None
        self.start()

    def run(self):
        try:
            self.answer = self.server.call("wait", pool=self.pool, host=self.host, http_timeout=60, **self.params)
        except OSError as e:  # its server was killed
            self.answer = e
        self.answered_at = time.monotonic()

    def result(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), f"{self.host} still waiting"
        return self.answer


def queued(server, count, pool="p"):
    assert wait_until(lambda: len(server.status(pool)["waiters"]) == count), server.status(pool)


def token(answer):
    assert answer.body == b"YES", answer
    return int(answer.headers["x-distributex-token"])


def test_a_hold_through_one_server_is_seen_by_the_other(cluster):
    a, b = cluster()
    assert a.call("get", pool="p", host="h1").body == b"YES"
    assert b.call("get", pool="p", host="h2").body == b"NO"
    assert [h["host"] for h in b.status("p")["holders"]] == ["h1"]


def test_release_through_another_server_hands_over(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="h1")
    assert b.call("release", pool="p", host="h1").body == b"OK"
    assert a.call("get", pool="p", host="h2").body == b"YES"


def test_waiters_are_served_in_arrival_order_across_servers(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="holder")
    first = Waiter(b, "first")
    queued(a, 1)
    second = Waiter(a, "second")
    queued(a, 2)
    a.call("release", pool="p", host="holder")
    assert first.result().body == b"YES"
    assert second.is_alive()
    b.call("release", pool="p", host="first")
    assert second.result().body == b"YES"


def test_get_does_not_overtake_a_waiter_on_another_server(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="holder")
    waiter = Waiter(b, "waiter")
    queued(a, 1)
    a.call("release", pool="p", host="holder")
    assert a.call("get", pool="p", host="barger").body == b"NO"
    assert waiter.result().body == b"YES"


def test_tokens_increase_strictly_across_three_servers(cluster):
    servers = cluster(3)
    tokens = []
    for i in range(12):
        server = servers[i % 3]
        tokens.append(token(server.call("get", pool="p", host=f"h{i}")))
        servers[(i + 1) % 3].call("release", pool="p", host=f"h{i}")
    assert tokens == sorted(set(tokens))


def test_holder_asking_another_server_is_renewed_with_the_same_token(cluster):
    a, b = cluster()
    first = token(a.call("get", pool="p", host="h1"))
    assert token(b.call("get", pool="p", host="h1")) == first
    assert token(b.call("wait", pool="p", host="h1")) == first
    assert len(a.status("p")["holders"]) == 1


def test_semaphore_holds_at_most_maxlocks_across_servers(cluster):
    servers = cluster(3, pools=[{"name": "p", "maxlocks": 2, "expire": 30}])
    answers = [s.call("get", pool="p", host=f"h{i}").body for i, s in enumerate(servers)]
    assert answers == [b"YES", b"YES", b"NO"]


def test_cross_server_grant_arrives_within_a_few_polls(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="holder")
    waiter = Waiter(b, "waiter")
    queued(a, 1)
    released = time.monotonic()
    a.call("release", pool="p", host="holder")
    assert waiter.result().body == b"YES"
    assert waiter.answered_at - released < 1.0


def test_an_expired_lease_goes_to_a_waiter_on_another_server(cluster):
    a, b = cluster(pools=[{"name": "p", "expire": 1}])
    a.call("get", pool="p", host="crashed")
    started = time.monotonic()
    waiter = Waiter(b, "next")
    assert waiter.result().body == b"YES"
    assert 0.8 < waiter.answered_at - started < 3.0


def test_a_waiter_that_times_out_leaves_the_shared_queue(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="holder")
    gone = Waiter(b, "gone", timeout=0.3)
    assert gone.result().body == b"NO"
    queued(a, 0)
    assert_next_waiter_is_served(a, b)


def test_a_waiter_that_hangs_up_leaves_the_shared_queue(cluster):
    a, b = cluster()
    a.call("get", pool="p", host="holder")
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        s.sendall(b"GET /wait/?pool=p&host=gone HTTP/1.1\r\nHost: x\r\n\r\n")
        queued(a, 1)
    queued(a, 0)
    assert_next_waiter_is_served(a, b)


def assert_next_waiter_is_served(a, b):
    """The queue is empty again: a new waiter on b is served when a's holder releases."""
    stays = Waiter(b, "stays")
    queued(a, 1)
    a.call("release", pool="p", host="holder")
    assert stays.result().body == b"YES"


def test_a_dead_servers_waiters_lose_their_places(cluster):
    a, b = cluster()
    b.call("get", pool="p", host="holder")
    Waiter(a, "on-dead-server")
    queued(b, 1)
    a.kill()
    later = Waiter(b, "later")
    # Within the presence TTL (5 s) the dead server's ticket is dropped.
    assert wait_until(lambda: [w["host"] for w in b.status("p")["waiters"]] == ["later"], timeout=15)
    b.call("release", pool="p", host="holder")
    assert later.result().body == b"YES"


def test_kill_9_and_restart_keeps_holds_and_tokens(cluster):
    a, b = cluster()
    first = token(a.call("get", pool="p", host="h1"))
    a.kill()
    a.start()
    assert [h["host"] for h in a.status("p")["holders"]] == ["h1"]
    assert a.call("get", pool="p", host="h2").body == b"NO"
    a.call("release", pool="p", host="h1")
    assert token(b.call("get", pool="p", host="h2")) > first


def test_sigterm_answers_local_waiters_but_keeps_shared_holds(cluster):
    a, b = cluster()
    b.call("get", pool="p", host="holder")
    waiter = Waiter(a, "waiter")
    queued(b, 1)
    assert a.terminate() == 0
    answer = waiter.result()
    assert (answer.status, answer.body) == (503, b"NO")
    status = b.status("p")
    assert [h["host"] for h in status["holders"]] == ["holder"]
    assert status["waiters"] == []


def test_memcached_down_answers_error_503_and_grants_nothing(cluster, own_memcached):
    a, b = cluster(memcache=own_memcached)
    a.call("get", pool="p", host="h1")
    own_memcached.kill()
    answer = b.call("get", pool="p", host="h2")
    assert (answer.status, answer.body) == (503, b"ERROR")
    assert answer.headers["x-distributex-reason"]
    assert b.call("wait", pool="p", host="h2", timeout=1).status == 503
    assert b.call("release", pool="p", host="h1").status == 503


def test_reconnects_when_memcached_returns(cluster, own_memcached):
    a, b = cluster(pools=[{"name": "p", "expire": 1}], memcache=own_memcached)
    own_memcached.kill()
    assert a.call("get", pool="p", host="h1").status == 503
    own_memcached.start()
    assert wait_until(lambda: a.call("get", pool="p", host="h1").status == 200, timeout=10)


def test_memcached_restart_blocks_the_pool_for_one_lease(cluster, own_memcached):
    a, b = cluster(pools=[{"name": "p", "expire": 2}], memcache=own_memcached)
    before = token(a.call("get", pool="p", host="h1"))
    own_memcached.kill()
    own_memcached.start()
    restarted = time.monotonic()
    # The forgotten holder may still be running: nobody gets the pool
    # until a whole lease has passed (at least LOCK_DELAY_MIN, 11 s, so
    # that tokens stay above every earlier one whatever the clocks).
    assert b.call("get", pool="p", host="h2").body == b"NO"
    assert a.call("get", pool="p", host="h3").body == b"NO"
    assert wait_until(lambda: b.call("get", pool="p", host="h2").body == b"YES", timeout=40)
    assert time.monotonic() - restarted > 1.5
    assert token(b.call("get", pool="p", host="h2")) > before
    assert "memcached lost" in a.log() + b.log()


def test_two_namespaces_share_one_memcached_without_meeting(cluster):
    (one,) = cluster(1, namespace="cluster-one")
    (two,) = cluster(1, namespace="cluster-two")
    assert one.call("get", pool="p", host="h1").body == b"YES"
    assert two.call("get", pool="p", host="h2").body == b"YES"


def test_each_pool_lives_on_one_of_several_memcached(start_server, memcached, own_memcached):
    pools = [{"name": f"p{i}", "expire": 30} for i in range(8)]
    config = dict(memcache_servers=[memcached.address, own_memcached.address], namespace=f"m{time.monotonic_ns()}")
    a = start_server(pools, backend="memcache", **config)
    b = start_server(pools, backend="memcache", **config)
    for i in range(8):
        assert a.call("get", pool=f"p{i}", host="h1").body == b"YES"
        assert b.call("get", pool=f"p{i}", host="h2").body == b"NO"


def test_a_holders_second_wait_is_answered_when_another_server_grants(cluster):
    s1, s2 = cluster()
    s2.call("get", pool="p", host="a")
    first = Waiter(s1, "w")
    queued(s2, 1)
    second = Waiter(s1, "w")
    queued(s2, 2)
    s2.call("release", pool="p", host="a")
    assert token(first.result(timeout=3)) == token(second.result(timeout=3))


def test_a_waiter_whose_place_memcached_lost_is_served_after_the_lock_delay(cluster, own_memcached):
    a, b = cluster(pools=[{"name": "p", "expire": 1}], memcache=own_memcached)
    a.call("get", pool="p", host="holder")
    waiter = Waiter(b, "waiter")
    queued(a, 1)
    own_memcached.kill()
    own_memcached.start()
    # Its place went with memcached's data; its server queues it again and
    # the pool grants it once the lock-delay has passed.
    assert waiter.result(timeout=40).body == b"YES"


def test_waiters_of_two_pools_on_one_server_stay_in_their_own_queues(start_server):
    # The poller once gave every pool the last pool's tickets to queue again:
    # a waiter for one pool then waited, and was granted, in every pool.
    server = start_server([{"name": "pool1", "expire": 30}, {"name": "pool2", "expire": 30}], backend="memcache")
    for pool in ("pool1", "pool2"):
        assert server.call("get", pool=pool, host="holder").body == b"YES"
    first = Waiter(server, "w1", "pool1")
    second = Waiter(server, "w2", "pool2")
    wait_until(lambda: [w["host"] for pool in ("pool1", "pool2") for w in server.status(pool)["waiters"]]
               == ["w1", "w2"], timeout=10)
    time.sleep(0.5)  # ten polls
    assert [w["host"] for w in server.status("pool1")["waiters"]] == ["w1"]
    assert [w["host"] for w in server.status("pool2")["waiters"]] == ["w2"]
    server.call("release", pool="pool1", host="holder")
    assert first.result().body == b"YES"
    server.call("release", pool="pool2", host="holder")
    assert second.result().body == b"YES"
