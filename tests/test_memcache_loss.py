"""The memcache backend when memcached loses its data, when a server dies,
and how a /wait is answered: real memcached, real twistd servers."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time

import pytest
from pymemcache.client.rendezvous import RendezvousHash

from test_memcache import Waiter, queued

pytestmark = pytest.mark.timeout(180)

MUTEX = [{"name": "p", "expire": 30}]


class Asked(threading.Thread):
    """One request in the background; .result() once it returns."""

    def __init__(self, server, path, **params):
        super().__init__(daemon=True)
        self.server, self.path, self.params = server, path, params
        self.answer = None
        self.start()

    def run(self):
        self.answer = self.server.call(self.path, http_timeout=60, **self.params)

    def result(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), f"{self.path} {self.params} not answered"
        return self.answer


@pytest.fixture
def cluster(start_server, memcached):
    def start(n=2, pools=MUTEX, memcache=memcached, namespace=None, **config):
        namespace = namespace or f"l{time.monotonic_ns()}"
        return [start_server(pools, backend="memcache", memcache=memcache,
                             namespace=namespace, **config) for _ in range(n)]
    return start


def test_a_restarted_memcached_is_noticed_by_a_server_that_never_saw_its_pool_busy(
        start_server, memcached, own_memcached):
    nodes = [memcached.address, own_memcached.address]
    ring = RendezvousHash(list(nodes))
    # The pool lives on the memcached that restarts; a key that a single
    # "epoch" check would read lives on the one that does not.
    for i in itertools.count():
        namespace = f"two{time.monotonic_ns()}x{i}"
        if (ring.get_node(f"{namespace}:pool:p") == own_memcached.address
                and ring.get_node(f"{namespace}:epoch") == memcached.address):
            break
    a, b = [start_server(MUTEX, backend="memcache", memcache_servers=nodes, namespace=namespace)
            for _ in range(2)]
    assert b.status("p")["holders"] == []  # b has read the pool, free
    assert a.call("get", pool="p", host="x").body == b"YES"
    own_memcached.kill()
    own_memcached.start()
    # x may still be working: b must not grant, although it never saw x.
    assert b.call("get", pool="p", host="y").body == b"NO"
    assert a.call("get", pool="p", host="z").body == b"NO"


def test_a_server_restarted_with_memcached_does_not_grant_what_another_server_remembers(
        cluster, own_memcached):
    a, b = cluster(memcache=own_memcached)
    assert b.call("get", pool="p", host="x").body == b"YES"
    own_memcached.kill()
    a.kill()
    own_memcached.start()
    a.start()
    # a remembers nothing, memcached nothing; b remembers, and a waits for it.
    assert a.call("get", pool="p", host="y").body == b"NO"


def test_a_server_started_after_a_flush_does_not_grant(cluster, start_server, own_memcached):
    (a,) = cluster(1, memcache=own_memcached, namespace="flushed")
    assert a.call("get", pool="p", host="x").body == b"YES"
    # a has not noticed the flush yet when the new server is asked.
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        own_memcached.flush()
        c = start_server(MUTEX, backend="memcache", memcache=own_memcached, namespace="flushed")
        asked = Asked(c, "get", pool="p", host="y")
        time.sleep(1)  # a stays stopped for a while (less than MARKER_SETTLE)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert asked.result().body == b"NO"
    assert "memcached lost" in a.log()


def test_a_grant_to_a_dead_servers_waiter_is_given_back(cluster):
    a, b = cluster(pools=[{"name": "p", "expire": 120}])
    b.call("get", pool="p", host="holder")
    Waiter(a, "on-dead-server")
    queued(b, 1)
    a.kill()
    # The grant goes to a waiter whose server is gone: nobody can be told.
    b.call("release", pool="p", host="holder")
    later = Waiter(b, "later")
    # Once a's presence is gone, its grant is given back (not held for a lease).
    assert later.result(timeout=60).body == b"YES"
    assert [h["host"] for h in b.status("p")["holders"]] == ["later"]


def test_a_holders_wait_is_answered_only_after_its_own_enqueue(cluster):
    a, b = cluster()
    assert a.call("get", pool="p", host="h").body == b"YES"
    # Many requests for the pool on a, then h's /wait behind them: while they
    # commit, h holds, but its /wait is not queued yet and must not be answered.
    gets = []
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", a.port), timeout=30)
        s.sendall(f"GET /get/?pool=p&host=g{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        gets.append(s)
    answer = a.call("wait", pool="p", host="h")
    assert answer.body == b"YES"
    b.call("release", pool="p", host="h")
    for s in gets:
        s.recv(1000)
        s.close()
    # Its enqueue renewed h's hold, which h has released: no ghost is left,
    # neither a hold of h nor a queued /wait that was answered already.
    status = b.status("p")
    assert "h" not in [h["host"] for h in status["holders"]]
    assert status["waiters"] == []
