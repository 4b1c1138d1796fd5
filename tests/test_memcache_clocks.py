"""The memcache backend when the servers' clocks disagree: real memcached,
real twistd servers, some of them under libfaketime (Debian's faketime),
and backends in this process whose clock measures race in threads."""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any, Callable, List

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from distributex.backend.base import BackendUnavailable
from distributex.backend.memcache import MARKER_SETTLE, MemcacheBackend
from distributex.config import parse_config
from distributex.pool import BUSY, Hold
from servers import wait_until
from test_memcache import token

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
                       and shutil.which("faketime") is None, reason="faketime is not installed"),
]

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.fixture
def start_clocked(start_server, memcached, monkeypatch):
    """start_clocked(offset, pools, **config): a memcache server whose clocks
    (all of them: libfaketime's FAKETIME_DONT_FAKE_MONOTONIC breaks timed
    waits) run ``offset`` ("+2s", "-10s") from the machine's."""
    namespace = f"k{time.monotonic_ns()}"

    def start(offset, pools, memcache=memcached, **config):
        with monkeypatch.context() as m:
            if offset:
                m.setenv("FAKETIME", offset)
                m.setenv("LD_PRELOAD", LIBFAKETIME)
            return start_server(pools, backend="memcache", memcache=memcache, namespace=namespace, **config)
    return start


@pytest.mark.parametrize("clocks", [("", "+2s"), ("-2s", "+2s")])
def test_a_server_whose_clock_runs_ahead_does_not_end_a_lease_early(start_clocked, clocks):
    pools = [{"name": "p", "expire": 1}]
    a, b = start_clocked(clocks[0], pools), start_clocked(clocks[1], pools)
    assert a.call("get", pool="p", host="h1").body == b"YES"
    # b's clock says h1's lease has run out; h1 has held it for milliseconds.
    assert b.call("get", pool="p", host="h2").body == b"NO"


def test_a_wall_clock_step_does_not_end_a_lease_early(memcached):
    # In this process, not under libfaketime: its FAKETIME_DONT_FAKE_MONOTONIC
    # (Debian's 0.9.10) mistimes every timed wait on the monotonic clock
    # (CPython's GIL, time.sleep), and a server under it on a busy machine
    # took seconds per request.
    step = [0.0]
    backend = in_process(memcached, wall=lambda: time.time() + step[0], pools="  - {name: p, expire: 2}\n",
                         clock=Clock())
    backend._submit = lambda name, ops: maybeDeferred(backend._transact, name, ops)  # type: ignore[method-assign]
    backend._beat_now()  # as at the start: this server's presence, its clock, the node's marker
    assert isinstance(settled(backend, backend.get("p", "h1", "h1")), Hold)
    step[0] = 2.5
    assert settled(backend, backend.get("p", "h2", "h2")) == BUSY


@pytest.mark.parametrize("offset", ["+10s", "-10s"])
def test_a_server_whose_clock_is_10_s_off_grants_nothing(start_clocked, offset):
    pools = [{"name": "p", "expire": 30}]
    a, b = start_clocked("", pools), start_clocked(offset, pools)
    answer = b.call("get", pool="p", host="h2")
    assert (answer.status, answer.body) == (503, b"ERROR")
    assert "clock" in answer.headers["x-distributex-reason"]
    assert a.call("get", pool="p", host="h1").body == b"YES"
    assert b.call("get", pool="p", host="h2").body == b"ERROR"
    assert "CRITICAL" in b.log().upper() and "clock" in b.log()


@pytest.mark.parametrize("offset", ["+10s", "-10s"])
def test_a_server_whose_clock_is_10_s_off_is_unhealthy(start_clocked, offset):
    (b,) = [start_clocked(offset, [{"name": "p", "expire": 30}])]
    answer = b.call("health")
    assert (answer.status, answer.body) == (503, b"ERROR")


def in_process(memcached: Any, wall: Callable[[], float], pools: str = "  - name: p\n",
               clock: Any = reactor) -> MemcacheBackend:
    """A memcache backend in this process, not started, on the given wall clock."""
    config = parse_config(f"backend: memcache\nmemcache_servers: ['{memcached.address}']\n"
                          f"namespace: skew{time.monotonic_ns()}\npools:\n{pools}")
    return MemcacheBackend(config, clock, wall=wall)


def settled(backend: MemcacheBackend, answer: Any) -> Any:
    """What a request to an in-process backend answered; a node still
    settling (a memcached younger than MARKER_SETTLE) retries on the
    backend's Clock."""
    if not isinstance(answer, Deferred):
        return answer
    results: List[Any] = []
    answer.addBoth(results.append)
    wait_until(lambda: results or backend.reactor.advance(0.1), timeout=MARKER_SETTLE + 5, interval=0.1)
    return results[0]


def test_a_check_during_the_first_clock_measure_already_sees_the_skew(memcached):
    # The first measure of a clock 10 s off logs a critical line; a
    # transaction that checks the clock in another thread meanwhile (at a
    # server's start) must not take it for a measure that found no skew.
    backend = in_process(memcached, wall=lambda: time.time() - 10)
    node = next(iter(backend.nodes.values()))
    checks: List[str] = []

    def check() -> None:
        try:
            backend._check_clock(node)
            checks.append("agrees")
        except BackendUnavailable:
            checks.append("skewed")

    def observer(event: dict) -> None:
        if event.get("log_level") == LogLevel.critical:
            other = threading.Thread(target=check)
            other.start()
            other.join()

    backend.log = Logger(observer=observer)
    backend._measure(node)
    assert checks == ["skewed"]


def test_a_clock_sample_taken_before_a_later_one_does_not_undo_its_verdict(memcached):
    # Two measures at once (a transaction's and the heartbeat's), the clock
    # stepped back 20 s between them, and the older sample reaching the node
    # last: it must not clear the newer one's verdict that the clock is off.
    offset = [0.0]
    backend = in_process(memcached, wall=lambda: time.time() + offset[0])
    node = next(iter(backend.nodes.values()))
    sampled = threading.Event()
    real_stats = backend._stats

    def stats(node_: object) -> dict:
        answer = real_stats(node_)  # type: ignore[arg-type]
        sampled.set()
        return answer

    with node.lock:  # the older measure waits for the node's lock after its sample
        older = threading.Thread(target=backend._measure, args=(node,))
        backend._stats = stats  # type: ignore[method-assign]
        older.start()
        assert sampled.wait(10)
        time.sleep(0.2)  # it reads the clock once more, then waits for the lock
        backend._stats = real_stats  # type: ignore[method-assign]
        offset[0] = -20.0
        backend._measure(node)
        assert node.skewed
    older.join(10)
    assert node.skewed
    with pytest.raises(BackendUnavailable):
        backend._check_clock(node)


def test_tokens_never_go_back_after_memcached_loses_a_pool(start_clocked, own_memcached):
    pools = [{"name": "p", "expire": 1}]
    a = start_clocked("+2s", pools, memcache=own_memcached)
    b = start_clocked("-2s", pools, memcache=own_memcached)
    first = token(a.call("get", pool="p", host="h1"))
    own_memcached.kill()
    own_memcached.start()
    # b's clock is 4 s behind a's; its first grant after the loss must still
    # carry a larger token than a's last one.
    assert wait_until(lambda: b.call("get", pool="p", host="h2").body == b"YES", timeout=90, interval=0.2)
    assert token(b.call("get", pool="p", host="h2")) > first
