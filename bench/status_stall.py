#!/usr/bin/env python3
"""Does a /status/ or /metrics of 100,000 pools hold up other requests?

One distributex server (in-memory) with --pools named pools. A probe client
cycles /get/ + /release/ on one pool over a keep-alive connection and times
every request, first on a quiet server, then while curl fetches the whole
/status/ (JSON and text) and /metrics in a loop. The figures are the probe's
latencies in both phases; the target is that the busy phase's p99 stays
under --max-p99 ms and its maximum under --max-stall ms.

    python bench/status_stall.py                    # 100,000 pools, 10 s per phase
    python bench/status_stall.py --pools 10000 --duration 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import LOOPBACK, Connection, Processes, Server, percentiles, print_header  # noqa: E402


def probe(port: int, duration: float) -> List[float]:
    """Request latencies (ms) of get+release cycles for ``duration`` seconds."""
    conn = Connection(port)
    latencies: List[float] = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        for path in ("/get/?pool=probe&host=probe", "/release/?pool=probe&host=probe"):
            started = time.perf_counter()
            answer = conn.call(path)
            latencies.append((time.perf_counter() - started) * 1000)
            assert answer.status == 200, answer
        time.sleep(0.001)  # a steady trickle, not a flood: we measure waiting, not throughput
    conn.close()
    return latencies


URLS = {"status json": "/status/?format=json", "status text": "/status/", "metrics": "/metrics"}


def fetch_loop(port: int, stop: threading.Event, fetched: Dict[str, List[float]], only: List[str]) -> None:
    urls = {name: f"http://{LOOPBACK}:{port}{path}" for name, path in URLS.items()
            if not only or name.split()[0] in only}
    while not stop.is_set():
        for name, url in urls.items():
            started = time.monotonic()
            subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "120", url], check=True)
            fetched.setdefault(name, []).append(time.monotonic() - started)
            if stop.is_set():
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--max-p99", type=float, default=10.0, help="target: busy-phase p99 in ms")
    parser.add_argument("--max-stall", type=float, default=25.0, help="target: busy-phase maximum in ms")
    parser.add_argument("--only", action="append", choices=("status", "metrics"), default=[],
                        help="fetch only this (repeatable; default both)")
    args = parser.parse_args()
    if not 1 <= args.pools <= 1_000_000 or not 1 <= args.duration <= 300:
        parser.error("--pools 1..1000000, --duration 1..300")

    with Processes() as procs:
        pools = [{"name": f"p{n}", "expire": 300} for n in range(args.pools)]
        pools.append({"name": "probe", "expire": 300})
        # A file of 100,000 pools takes PyYAML ten seconds or more to read.
        server = Server(procs, pools, {"state_file": None}, name="dx", start_timeout=180)
        # Some pools busy, so that /status/ and /metrics have something to say.
        conn = Connection(server.port)
        for n in range(0, args.pools, max(1, args.pools // 1000)):
            conn.call(f"/get/?pool=p{n}&host=h{n}")
        conn.close()
        print_header("distributex: other requests while /status/ and /metrics of every pool are served",
                     [f"{args.pools} pools, in-memory; probe: /get/ + /release/ cycles on one pool, "
                      f"{args.duration:g} s per phase; fetcher: curl of /status/ (JSON, text) and /metrics"])
        quiet = percentiles(probe(server.port, args.duration))
        stop = threading.Event()
        fetched: Dict[str, List[float]] = {}
        fetcher = threading.Thread(target=fetch_loop, args=(server.port, stop, fetched, args.only), daemon=True)
        fetcher.start()
        time.sleep(0.5)  # the first fetch is under way
        busy = percentiles(probe(server.port, args.duration))
        stop.set()
        fetcher.join(180)
        server.stop()

    def line(name: str, p: Dict[str, float]) -> str:
        return (f"  {name:<28} p50 {p['p50']:6.2f} ms  p99 {p['p99']:6.2f} ms  max {p['max']:7.2f} ms")

    print(line("quiet server:", quiet))
    print(line("while fetching everything:", busy))
    for name, times in fetched.items():
        print(f"  {name + ' fetch:':<28} {len(times)} done, median {sorted(times)[len(times) // 2]:.2f} s")
    ok = busy["p99"] <= args.max_p99 and busy["max"] <= args.max_stall and fetched
    print(f"  target: p99 <= {args.max_p99:g} ms and max <= {args.max_stall:g} ms while fetching: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
