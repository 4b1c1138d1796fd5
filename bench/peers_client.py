#!/usr/bin/env python3
"""One client process of bench/peers.py (not run by hand).

Holds one keep-alive connection to its lock service and talks to the parent
through stdin/stdout, one JSON line each way:

    parent <- {"ready": true}                   connected, first round trip done
    parent -> {"start": NS, "end": NS}          (cycles) the window, CLOCK_MONOTONIC ns
    parent -> {"go": true}                      (handoff)
    parent <- {"cycles": ..., ...}              the results, then the process exits

``--kind dx``: distributex over raw HTTP/1.1 (``/wait/`` with a fresh random
session per acquisition, as the real client does, then ``/release/`` with
that session), answers parsed by status line and Content-Length.
``--kind redis``: python-redis-lock, ``Lock(conn, name, expire).acquire()``
and ``release()``, a new Lock (so a new random id) per acquisition.

Every clock reading is ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock
for every process of the machine), so that a release timed in one process
and the grant timed in another can be subtracted.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import sys
import time
from typing import List, Optional, Tuple

LOOPBACK = "127.0.0.1"
SOCKET_TIMEOUT = 60.0      # no socket read blocks longer (a lease is 30 s)
BLOCKED_TIMEOUT = 10.0     # the peer's acquire must show as blocked within this
BATON_TIMEOUT = 30.0       # the peer's grant must come within this


class ProtocolError(Exception):
    pass


# -- distributex: HTTP/1.1 keep-alive -------------------------------------------

class DxClient:
    """A blocking keep-alive HTTP/1.1 connection to one distributex server."""

    def __init__(self, port: int, pool: str, host: str) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=SOCKET_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.query = f"pool={pool}&host={host}".encode()
        self.tail = f" HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode()
        self.pool = pool

    def request(self, path: bytes) -> Tuple[int, bytes]:
        self.sock.sendall(b"GET " + path + self.tail)
        return self.read()

    def read(self) -> Tuple[int, bytes]:
        """One response: (status, body). Content-Length framing only, which
        is what the server sends; anything else is an error, not a guess."""
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > 65536:
                raise ProtocolError("response head over 64 KiB")
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("server closed the connection")
            buf += data
        lines = buf[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(rest[:3])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding":
                raise ProtocolError("chunked response: not expected from distributex")
            elif name == b"connection" and value.strip().lower() == b"close":
                raise ProtocolError("server closes the connection")
        if length is None:
            raise ProtocolError("response without Content-Length")
        need = end + 4 + length
        while len(buf) < need:
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("server closed the connection mid-body")
            buf += data
        body = buf[end + 4:need]
        self.buf = buf[need:]
        return status, body

    def acquire(self) -> bytes:
        session = os.urandom(8).hex().encode()
        status, body = self.request(b"/wait/?" + self.query + b"&session=" + session)
        if status != 200 or body != b"YES":
            raise ProtocolError(f"/wait/ answered {status} {body[:80]!r}")
        return session

    def release(self, session: bytes) -> None:
        status, body = self.request(b"/release/?" + self.query + b"&session=" + session)
        if status != 200 or body != b"OK":
            raise ProtocolError(f"/release/ answered {status} {body[:80]!r}")

    def warm(self) -> None:
        status, _ = self.request(b"/status/?pool=" + self.pool.encode() + b"&format=json")
        if status != 200:
            raise ProtocolError(f"/status/ answered {status}")

    def waiters(self) -> int:
        """How many are queued on the pool (a control connection's question)."""
        status, body = self.request(b"/status/?pool=" + self.pool.encode() + b"&format=json")
        if status != 200:
            raise ProtocolError(f"/status/ answered {status}")
        return len(json.loads(body)["pools"][0]["waiters"])


# -- python-redis-lock ------------------------------------------------------------

class RedisClient:
    def __init__(self, port: int, pool: str, expire: int) -> None:
        import redis
        import redis_lock
        self.redis_lock = redis_lock
        self.conn = redis.StrictRedis(host=LOOPBACK, port=port, socket_timeout=SOCKET_TIMEOUT,
                                      socket_connect_timeout=10)
        self.pool = pool
        self.expire = expire

    def acquire(self) -> object:
        lock = self.redis_lock.Lock(self.conn, self.pool, expire=self.expire)
        if not lock.acquire(blocking=True):
            raise ProtocolError("redis_lock acquire returned False")
        return lock

    def release(self, lock: object) -> None:
        lock.release()  # type: ignore[attr-defined]

    def warm(self) -> None:
        self.conn.ping()
        self.redis_lock.Lock(self.conn, self.pool, expire=self.expire).locked()

    def waiters(self) -> int:
        return int(self.conn.info("clients")["blocked_clients"])


# -- the two measurements ----------------------------------------------------------

def send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def receive(timeout: float) -> dict:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        raise SystemExit("no word from the parent")
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the parent went away")
    return json.loads(line)


def cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def cycles(client, flag: mmap.mmap, max_time: float) -> None:
    """Acquire, a tiny critical section, release, until the window ends.

    The critical section checks a byte shared by every client of the run
    (an mmap of one file): set while held, so a second holder shows as an
    overlap. A cycle counts when its release has returned before the end."""
    msg = receive(max_time)
    start, end = msg["start"], msg["end"]
    now = time.monotonic_ns
    while now() < start:
        time.sleep(min(0.01, max(0.0, (start - now()) / 1e9)))
    cpu0 = cpu_now()
    count = overlaps = 0
    acquire, release = client.acquire, client.release
    while True:
        handle = acquire()
        if flag[0]:
            overlaps += 1
        flag[0] = 1
        flag[0] = 0
        release(handle)
        if now() > end:
            break
        count += 1
    send({"cycles": count, "overlaps": overlaps, "cpu": cpu_now() - cpu0})


def handoff(client, control, index: int, total: int, baton_in: int, baton_out: int,
            hold: float, max_time: float) -> None:
    """Two processes take turns: acquisition n belongs to process n % 2.

    The holder of n waits until its peer is blocked in its acquire (seen on a
    control connection: distributex's /status/ waiters, Redis's
    blocked_clients), reads the clock, releases; the peer reads the clock when
    its acquire returns (with ``hold``, the holder first sleeps that long, so
    that the release comes to an idle server). After its release a process waits for the peer's
    word that it has the lock (a byte on a pipe) before it asks again, so the
    two strictly alternate (python-redis-lock would otherwise let the
    releaser take the lock straight back)."""
    receive(max_time)
    deadline = time.monotonic() + max_time
    now = time.monotonic_ns
    acquired: List[int] = []
    released: List[int] = []
    cpu0 = cpu_now()
    for n in range(index, total, 2):
        if time.monotonic() > deadline:
            raise SystemExit(f"handoff: out of time at acquisition {n} of {total}")
        if n > 0:
            wait_baton(baton_in)
        handle = client.acquire()
        acquired.append(now())
        if n + 1 < total:
            os.write(baton_out, b"x")
            blocked_by = time.monotonic() + BLOCKED_TIMEOUT
            while control.waiters() < 1:
                if time.monotonic() > blocked_by:
                    raise SystemExit(f"handoff: the peer's acquire {n + 1} never blocked")
                time.sleep(0.0002)
            if hold:
                time.sleep(hold)
            released.append(now())
        client.release(handle)
    send({"acquired": acquired, "released": released, "cpu": cpu_now() - cpu0})


def wait_baton(fd: int) -> None:
    ready, _, _ = select.select([fd], [], [], BATON_TIMEOUT)
    if not ready or os.read(fd, 1) != b"x":
        raise SystemExit("handoff: no word from the peer")


def main() -> int:
    p = argparse.ArgumentParser(description="one client of bench/peers.py")
    p.add_argument("--kind", choices=("dx", "redis"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--expire", type=int, default=30)
    p.add_argument("--mode", choices=("cycles", "handoff"), required=True)
    p.add_argument("--flag-file", help="(cycles) the shared overlap byte")
    p.add_argument("--index", type=int, default=0, help="(handoff) 0 or 1")
    p.add_argument("--total", type=int, default=0, help="(handoff) acquisitions in all")
    p.add_argument("--baton-in", type=int, help="(handoff) fd: the peer has the lock")
    p.add_argument("--baton-out", type=int, help="(handoff) fd: tell the peer")
    p.add_argument("--hold", type=float, default=0.0, help="(handoff) seconds to sleep before a release")
    p.add_argument("--max-time", type=float, default=120.0)
    a = p.parse_args()
    if a.kind == "dx":
        client = DxClient(a.port, a.pool, a.host)
        control: Optional[object] = DxClient(a.port, a.pool, a.host) if a.mode == "handoff" else None
    else:
        client = RedisClient(a.port, a.pool, a.expire)
        control = RedisClient(a.port, a.pool, a.expire) if a.mode == "handoff" else None
    client.warm()
    if control is not None:
        control.warm()  # type: ignore[attr-defined]
    if a.mode == "cycles":
        with open(a.flag_file, "r+b") as f:
            flag = mmap.mmap(f.fileno(), 1)
        send({"ready": True})
        cycles(client, flag, a.max_time)
    else:
        send({"ready": True})
        handoff(client, control, a.index, a.total, a.baton_in, a.baton_out, a.hold, a.max_time)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
