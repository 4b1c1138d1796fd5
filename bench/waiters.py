#!/usr/bin/env python3
"""Many concurrent /wait/ connections on one pool, then a FIFO drain.

1. One host ("holder") takes the pool.
2. The load generator opens --count keep-alive connections (non-blocking
   connects in batches, from the source addresses 127.0.0.2, 127.0.0.3, ...
   so as to pass the ~28,000 ephemeral ports of one address) and, once the
   server has accepted them all, sends one /wait/ on each, in order; the
   host name of waiter i is w0000i, its place in the send order.
3. When the server is idle again: its RSS (VmRSS from /proc), and
   /status/?format=json must list --count waiters; their order there is
   the server's queue.
4. Drain one by one: the holder releases; the head waiter gets YES and
   releases on its own connection, then closes it; the next waiter gets
   YES, ... The grants must come in the server's queue order (FIFO), which
   should also be the send order. Prints the drain time and rate.

Both sides raise their file limits: this process with setrlimit, the
server through `prlimit --nofile=N:N twistd ...`. Everything is bounded by
--max-time.

    python bench/waiters.py                   # 5,000 waiters
    python bench/waiters.py --count 50000     # the issue's figure
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (LOOPBACK, NPROC, Connection, CpuWatch, Processes, ResponseParser,  # noqa: E402
                    Server, add_quiet_option, add_server_options, cpu_seconds, percentiles,
                    print_header, request_bytes, rss_mib, server_settings, wait_quiet)

POOL = "big"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Timeout(Exception):
    pass


def raise_nofile(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_idle(pid: int, deadline: float, quiet: float = 0.5) -> None:
    """Until the server has used no CPU for ``quiet`` seconds."""
    last = cpu_seconds(pid)
    still_since = time.monotonic()
    while True:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        t = time.monotonic()
        if now - last > 0.01:
            still_since = t
        last = now
        if t - still_since >= quiet:
            return
        if t > deadline:
            raise Timeout("the server never went idle")


def open_connections(count: int, port: int, sources: List[str], per_address: int, batch: int,
                     server_pid: int, deadline: float) -> List[socket.socket]:
    """``count`` connected sockets, connected in index order in batches."""
    sel = selectors.DefaultSelector()
    socks: List[Optional[socket.socket]] = [None] * count
    in_flight = 0
    nxt = 0
    done = 0
    last_report = time.monotonic()
    while done < count:
        if time.monotonic() > deadline:
            raise Timeout(f"only {done} of {count} connections open")
        # Do not run ahead of the server's accept loop by more than two
        # batches: the listen backlog is finite and a dropped SYN costs a 1 s retry.
        room = nxt < count and in_flight < batch
        if room and nxt and nxt % batch == 0 and fd_count(server_pid) < nxt - 2 * batch:
            room = False
            time.sleep(0.005)
        while room and in_flight < batch and nxt < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.bind((sources[nxt // per_address], 0))
            s.setblocking(False)
            rc = s.connect_ex((LOOPBACK, port))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, f"connect #{nxt} from {sources[nxt // per_address]}: {os.strerror(rc)}")
            socks[nxt] = s
            sel.register(s, selectors.EVENT_WRITE, nxt)
            in_flight += 1
            nxt += 1
            if nxt % batch == 0:
                break
        if not in_flight:
            continue
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            sel.unregister(s)
            in_flight -= 1
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect #{key.data}: {os.strerror(err)}")
            done += 1
        if time.monotonic() - last_report > 5:
            print(f"  ... {done} connected", flush=True)
            last_report = time.monotonic()
    sel.close()
    return socks  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="waiters (default 5000; the issue: 50000)")
    parser.add_argument("--per-address", type=int, default=10000,
                        help="connections per loopback source address (default 10000)")
    parser.add_argument("--batch", type=int, default=1000, help="connects in flight (default 1000)")
    parser.add_argument("--max-time", type=float, default=600.0,
                        help="give up after this many seconds in all (default 600)")
    parser.add_argument("--rss-limit", type=float, default=1024.0, help="target server RSS in MiB (default 1024)")
    add_quiet_option(parser)
    add_server_options(parser)
    args = parser.parse_args()
    n = args.count
    n_sources = -(-n // args.per_address)
    if not 1 <= n <= 500_000 or n_sources > 250 or not 1 <= args.per_address <= 28000:
        parser.error("--count 1..500000, --per-address 1..28000, at most 250 source addresses")
    start = time.monotonic()
    deadline = start + args.max_time
    # Each side needs one descriptor per waiter, plus a few of its own.
    wanted = n + 2000
    nofile = raise_nofile(wanted)
    limit_note = ""
    if nofile < n + 100:
        # Some sandboxes forbid raising the hard limit even to root; run at the
        # largest count that fits and say so loudly rather than fail.
        capped = nofile - 100
        limit_note = (f"NOTE: the hard RLIMIT_NOFILE here is {nofile} and cannot be raised "
                      f"(setrlimit: EPERM), so --count {n} is capped to {capped}; run on a machine "
                      f"where `prlimit --nofile={wanted}:{wanted}` works for the full figure")
        n = capped
    server_nofile = nofile
    pin = NPROC >= 2
    n_sources = -(-n // args.per_address)
    sources = [f"127.0.0.{2 + i}" for i in range(n_sources)]

    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    with Processes(keep_dir=args.keep) as procs:
        settings = server_settings(args, procs)
        server = Server(procs, [{"name": POOL, "expire": 3600}], settings, name="dx-waiters",
                        access_log=args.access_log, cpu=0 if pin else None,
                        nofile=server_nofile, backlog=4096)
        if pin:
            os.sched_setaffinity(0, {1})
        with open(f"/proc/{server.pid}/limits") as f:
            limit = next(line.split()[3] for line in f if line.startswith("Max open files"))
        print_header("distributex: concurrent /wait/ connections on one pool, then a FIFO drain", [
            f"backend: {settings.get('backend', 'inmemory')}; server on 127.0.0.1:{server.port} "
            f"(listen backlog 4096, file limit {limit}), pinned to CPU 0; client on CPU 1"
            if pin else f"server on 127.0.0.1:{server.port}",
            f"waiters: {n} from {n_sources} source address(es) {sources[0]}..{sources[-1]}, "
            f"{args.per_address} per address; client file limit {nofile}; max time {args.max_time:g} s",
        ] + ([limit_note] if limit_note else []) + ([quiet] if quiet else []))
        watch = CpuWatch([server.pid] + ([procs.memcached.pid] if procs.memcached else []))
        rss0, _ = rss_mib(server.pid)
        control = Connection(server.port, timeout=120)
        r = control.call(f"/get/?pool={POOL}&host=holder")
        if r.body != b"YES":
            raise SystemExit(f"holder could not take the pool: {r}")
        status_code = 1
        socks: List[socket.socket] = []
        try:
            # -- 1. connect ---------------------------------------------------
            t0 = time.monotonic()
            socks = open_connections(n, server.port, sources, args.per_address, args.batch,
                                     server.pid, deadline)
            while fd_count(server.pid) < n:
                if time.monotonic() > deadline:
                    raise Timeout(f"the server accepted only {fd_count(server.pid)} connections")
                time.sleep(0.05)
            t_connect = time.monotonic() - t0
            wait_idle(server.pid, deadline, quiet=0.3)
            rss_idle, _ = rss_mib(server.pid)
            print(f"connected {n} in {t_connect:.1f} s ({n / t_connect:.0f}/s); "
                  f"server RSS {rss0:.0f} MiB at start, {rss_idle:.0f} MiB with {n} idle connections",
                  flush=True)

            # -- 2. queue: one /wait/ per connection, in index order -----------
            width = len(str(n - 1))
            t0 = time.monotonic()
            for i, s in enumerate(socks):
                s.sendall(request_bytes(f"/wait/?pool={POOL}&host=w{i:0{width}d}", server.port))
            t_sent = time.monotonic() - t0
            wait_idle(server.pid, deadline, quiet=0.5)
            t_queued = time.monotonic() - t0
            rss_q, hwm_q = rss_mib(server.pid)
            t1 = time.monotonic()
            r = control.call(f"/status/?pool={POOL}&format=json")
            t_status = time.monotonic() - t1
            pool = json.loads(r.body)["pools"][0]
            queue = [w["host"] for w in pool["waiters"]]
            holders = [h["host"] for h in pool["holders"]]
            rss_s, hwm_s = rss_mib(server.pid)
            out_of_order = sum(1 for pos, h in enumerate(queue) if h != f"w{pos:0{width}d}")
            print(f"sent {n} /wait/ in {t_sent:.2f} s; all handled by the server after {t_queued:.1f} s "
                  f"(including 0.5 s of idle check)")
            print(f"/status/?format=json: {len(queue)} waiters, holders {holders}; "
                  f"{len(r.body) / 1e6:.1f} MB of JSON in {t_status:.2f} s; queue order = send order: "
                  + ("yes" if not out_of_order and len(queue) == n else f"no ({out_of_order} differ)"))
            print(f"server RSS with {n} waiters queued: {rss_q:.0f} MiB "
                  f"({(rss_q - rss0) * 1024 / n:.1f} KiB per waiter over the {rss0:.0f} MiB at start); "
                  f"after the /status/ call {rss_s:.0f} MiB, peak (VmHWM) {hwm_s:.0f} MiB", flush=True)
            if limit_note:
                print(f"(projection, not a measurement: at {(rss_q - rss0) * 1024 / n:.1f} KiB per waiter, "
                      f"{args.count} waiters would take about "
                      f"{rss0 + (rss_q - rss0) * args.count / n:.0f} MiB)")
            if len(queue) != n:
                raise Timeout(f"/status/ shows {len(queue)} waiters, not {n}")

            # -- 3. drain one by one ---------------------------------------------
            sel = selectors.DefaultSelector()
            index: Dict[int, int] = {}
            for i, s in enumerate(socks):
                sel.register(s, selectors.EVENT_READ, i)
                index[s.fileno()] = i
            parsers: Dict[int, ResponseParser] = {}
            grants: List[int] = []
            grant_times: List[float] = []
            tokens: List[int] = []
            bad: List[str] = []
            released = 0
            t0 = time.monotonic()
            control.call(f"/release/?pool={POOL}&host=holder")
            last = time.perf_counter()
            while released < n:
                if time.monotonic() > deadline:
                    raise Timeout(f"drain stopped by --max-time after {len(grants)} grants")
                events = sel.select(timeout=10)
                if not events:
                    raise Timeout(f"no answer for 10 s after {len(grants)} grants")
                for key, _ in events:
                    s, i = key.fileobj, key.data
                    data = s.recv(65536)
                    if not data:
                        bad.append(f"w{i} closed by the server")
                        sel.unregister(s)
                        released += 1
                        continue
                    for resp in parsers.setdefault(i, ResponseParser()).feed(data):
                        if resp.body == b"YES":
                            now = time.perf_counter()
                            grant_times.append(now - last)
                            last = now
                            grants.append(i)
                            tokens.append(int(resp.headers[b"x-distributex-token"]))
                            s.sendall(request_bytes(f"/release/?pool={POOL}&host=w{i:0{width}d}",
                                                    server.port))
                        elif resp.body == b"OK":
                            sel.unregister(s)
                            s.close()
                            parsers.pop(i, None)
                            released += 1
                        else:
                            bad.append(f"w{i}: {resp}")
            t_drain = time.monotonic() - t0
            sel.close()
            socks = []
            rss_end, hwm_end = rss_mib(server.pid)

            queue_pos = {int(h[1:]): pos for pos, h in enumerate(queue)}
            fifo_server = [queue_pos[i] for i in grants] == list(range(n))
            fifo_send = grants == list(range(n))
            tokens_up = all(a < b for a, b in zip(tokens, tokens[1:]))
            p = percentiles(grant_times[1:] or [0.0])
            after = control.call(f"/status/?pool={POOL}&format=json")
            left = json.loads(after.body)["pools"][0]
            print(f"drained {len(grants)} waiters one by one in {t_drain:.1f} s: "
                  f"{len(grants) / t_drain:.0f} handoffs/s; time between grants "
                  f"p50 {p['p50'] * 1000:.3f} ms, p99 {p['p99'] * 1000:.3f} ms, max {p['max'] * 1000:.1f} ms")
            print(f"grant order = server queue order (FIFO): {'yes' if fifo_server else 'NO'}; "
                  f"= send order: {'yes' if fifo_send else 'no'}; tokens strictly increasing: "
                  f"{'yes' if tokens_up else 'NO'}; unexpected answers: {len(bad)} {bad[:3]}")
            print(f"after the drain: {len(left['holders'])} holders, {len(left['waiters'])} waiters; "
                  f"server RSS {rss_end:.0f} MiB, peak {hwm_end:.0f} MiB")
            ok_rss = rss_q < args.rss_limit and hwm_s < args.rss_limit
            print(f"targets: {n} waiters queued: {'PASS' if len(queue) == n else 'FAIL'}; RSS < "
                  f"{args.rss_limit:.0f} MiB: {'PASS' if ok_rss else 'FAIL'} ({rss_q:.0f} MiB queued, "
                  f"{hwm_s:.0f} MiB peak); FIFO drain: {'PASS' if fifo_server and not bad else 'FAIL'}")
            status_code = 0 if (len(queue) == n and ok_rss and fifo_server and tokens_up and not bad) else 2
        except Timeout as e:
            print(f"STOPPED: {e}")
            status_code = 3
        finally:
            for s in socks:
                s.close()
            control.close()
            print(watch.report())
            exit_status = server.stop()
            print(f"total {time.monotonic() - start:.1f} s; server exit status {exit_status}")
            if args.keep:
                print(f"logs and configs kept in {procs.dir}")
        return status_code


if __name__ == "__main__":
    sys.exit(main())
