#!/usr/bin/env python3
"""distributex against python-redis-lock: handoff latency and lock cycles per second.

In one run on one machine the script starts a distributex server (``twistd
-n distributex``, in-memory backend, its state file on unless
``--no-state-file``) and a redis-server (no persistence unless
``--redis-aof``, which matches the state file: appended with write(2)
before the answer, no fsync), both on free 127.0.0.1 ports, and measures
both with the same kind of clients: each client is its own Python process
(bench/peers_client.py) on one keep-alive connection.

* distributex: raw HTTP/1.1, ``/wait/?pool=P&host=H&session=S`` with a fresh
  random session per acquisition (as the real client does), then
  ``/release/?pool=P&host=H&session=S``.
* Redis: ``redis_lock.Lock(conn, name, expire=30).acquire(blocking=True)``
  and ``release()`` (python-redis-lock: SET NX, BLPOP on a signal list).
  Both locks have the same 30 s lease.

Measures, per round:

* handoff: two processes ping-pong one lock. The holder waits until the
  other is blocked in its acquire, reads the clock and releases; the other
  reads the clock when its acquire returns. The latency is the difference,
  on CLOCK_MONOTONIC (``time.monotonic_ns``, one clock for every process).
  p50 and p99 over ``--handoffs`` handoffs.
* cycles/s: N processes (``--clients``, default 1, 8, 32) loop acquire, a
  tiny critical section (a shared byte that would show an overlap), release,
  for ``--duration`` seconds: the total rate, and the per-process min and
  max (fairness).

Rounds go A (distributex), B (Redis), A, B, ...; the summary gives the median
of the per-round ratios distributex / Redis, which cancels slow drifts of a
shared machine, and the targets of issue 13: distributex's handoff p50 at or
below Redis's (ratio <= 1), and its cycles/s at every N at least 1.2x
Redis's. Exit status 0 when every target is met, 2 when one is missed.

    python bench/peers.py                       # 3 rounds, 10 s per rate
    python bench/peers.py --quick               # 2 rounds, 3 s, fewer handoffs
    python bench/peers.py --no-state-file --redis-aof
    python bench/peers.py --clients 1 --handoffs 200 --hold 0.3   # releases to an idle server
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (HERE, LOOPBACK, Processes, Server, add_quiet_option,  # noqa: E402
                    busy_seconds, cpu_seconds, free_port, percentiles, print_header, wait_quiet)

CLIENT = os.path.join(HERE, "peers_client.py")
POOL = "peers"
EXPIRE = 30            # the lease of both locks, seconds
HANDOFF_TARGET = 1.0   # distributex p50 / Redis p50 at most this
CYCLES_TARGET = 1.2    # distributex cycles/s / Redis's at least this
NAMES = {"dx": "distributex", "redis": "redis-lock"}


# -- the services -----------------------------------------------------------------

def start_redis(procs: Processes, aof: bool) -> Tuple[subprocess.Popen, int, str]:
    redis_server = shutil.which("redis-server")
    if not redis_server:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    persistence = (["--appendonly", "yes", "--appendfsync", "no"] if aof
                   else ["--appendonly", "no"])
    cmd = [redis_server, "--bind", LOOPBACK, "--port", str(port), "--save", "",
           "--dir", procs.dir, "--protected-mode", "yes", "--daemonize", "no",
           "--maxclients", "1000"] + persistence
    proc = procs.spawn(cmd, f"redis-{port}.log", port=port)
    version = subprocess.run([redis_server, "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split()
    v = next((w.split("=", 1)[1] for w in version if w.startswith("v=")), "?")
    return proc, port, (f"redis-server {v} (:{port}, "
                        + ("AOF appendfsync no" if aof else "no persistence") + ")")


def library_versions() -> str:
    try:
        from importlib.metadata import version
        return f"python-redis-lock {version('python-redis-lock')}, redis-py {version('redis')}"
    except Exception as error:  # pragma: no cover - reported, not fatal here
        raise SystemExit(f"python-redis-lock and redis are needed: pip install python-redis-lock redis "
                         f"({error})")


# -- the client processes -----------------------------------------------------------

class Clients:
    """Client processes with pipes to and from them; all killed on exit."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.list: List[subprocess.Popen] = []

    def start(self, args: List[str], pass_fds: Sequence[int] = ()) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, CLIENT] + args, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=tuple(pass_fds), cwd=self.procs.dir)
        self.list.append(proc)
        self.procs.procs.append(proc)  # so that Processes kills it on Ctrl-C or an error
        return proc

    def read_all(self, deadline: float, what: str) -> List[dict]:
        """One JSON line from each client, by the deadline."""
        out: Dict[int, dict] = {}
        bufs: Dict[int, bytes] = {p.stdout.fileno(): b"" for p in self.list}  # type: ignore[union-attr]
        index = {p.stdout.fileno(): i for i, p in enumerate(self.list)}  # type: ignore[union-attr]
        while len(out) < len(self.list):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{what}: {len(self.list) - len(out)} clients did not answer "
                                   f"in time{self._errors()}")
            fds = [fd for fd in bufs if index[fd] not in out]
            ready, _, _ = select.select(fds, [], [], min(left, 1.0))
            for fd in ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise RuntimeError(f"{what}: a client exited{self._errors()}")
                bufs[fd] += data
                if b"\n" in bufs[fd]:
                    line, _, bufs[fd] = bufs[fd].partition(b"\n")
                    out[index[fd]] = json.loads(line)
        return [out[i] for i in range(len(self.list))]

    def tell_all(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        for p in self.list:
            p.stdin.write(line)  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]

    def _errors(self) -> str:
        lines = []
        for p in self.list:
            if p.poll() is not None and p.stderr is not None:
                err = p.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                if err:
                    lines.append(f"pid {p.pid} (exit {p.returncode}): " + " | ".join(err))
        return (":\n  " + "\n  ".join(lines)) if lines else ""

    def stop(self) -> None:
        for p in self.list:
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    if f:
                        f.close()
                except OSError:
                    pass
            self.procs.stop(p, timeout=5.0)
        self.list = []


# -- one measurement -------------------------------------------------------------------

class Service:
    def __init__(self, kind: str, port: int, pid: int) -> None:
        self.kind = kind
        self.port = port
        self.pid = pid

    def client_args(self, host: str, mode: str) -> List[str]:
        return ["--kind", self.kind, "--port", str(self.port), "--pool", POOL, "--host", host,
                "--expire", str(EXPIRE), "--mode", mode]


class Usage:
    """CPU of the service, of our clients and of everything else during one measurement."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.t0 = time.monotonic()
        self.srv0 = cpu_seconds(service.pid)
        self.busy0 = busy_seconds()[0]

    def end(self, clients_cpu: float) -> Dict[str, float]:
        wall = time.monotonic() - self.t0
        srv = cpu_seconds(self.service.pid) - self.srv0
        busy = busy_seconds()[0] - self.busy0
        # Our client processes' start-up and the parent are in "other" too:
        # small beside a run of seconds, but it is an upper bound.
        return {"server": srv / wall, "clients": clients_cpu / wall,
                "other": max(0.0, busy - srv - clients_cpu) / wall}


def measure_handoff(procs: Processes, service: Service, count: int, warmup: int,
                    hold: float, max_time: float) -> Dict[str, object]:
    total = count + warmup + 1
    clients = Clients(procs)
    r0, w0 = os.pipe()  # to process 0: the peer has the lock
    r1, w1 = os.pipe()  # to process 1
    try:
        for index, (bin_, bout) in enumerate(((r0, w1), (r1, w0))):
            clients.start(service.client_args(f"peer{index}", "handoff")
                          + ["--index", str(index), "--total", str(total),
                             "--baton-in", str(bin_), "--baton-out", str(bout),
                             "--hold", str(hold), "--max-time", str(max_time)], pass_fds=(bin_, bout))
        clients.read_all(time.monotonic() + 30, "handoff start")
        usage = Usage(service)
        clients.tell_all({"go": True})
        results = clients.read_all(time.monotonic() + max_time + 10, "handoff")
        cpu = usage.end(sum(r["cpu"] for r in results))
    finally:
        clients.stop()
        for fd in (r0, w0, r1, w1):
            os.close(fd)
    acquired = [0] * total
    released = [0] * (total - 1)
    for index, r in enumerate(results):
        acquired[index::2] = r["acquired"]
        released[index::2] = r["released"]
    samples = [(acquired[n + 1] - released[n]) / 1e6 for n in range(warmup, total - 1)]
    if any(s <= 0 for s in samples):
        raise RuntimeError(f"{NAMES[service.kind]}: a grant came before its release: the peers "
                           "did not alternate")
    p = percentiles(samples, (50, 99))
    return {"p50": p["p50"], "p99": p["p99"], "n": len(samples), "cpu": cpu}


def measure_cycles(procs: Processes, service: Service, n: int, duration: float,
                   flag_path: str) -> Dict[str, object]:
    with open(flag_path, "wb") as f:
        f.write(b"\0")
    clients = Clients(procs)
    try:
        for i in range(n):
            clients.start(service.client_args(f"client{i}", "cycles")
                          + ["--flag-file", flag_path, "--max-time", str(duration + 60)])
        clients.read_all(time.monotonic() + 30 + n, f"N={n} start")
        start = time.monotonic_ns() + 200_000_000
        end = start + int(duration * 1e9)
        clients.tell_all({"start": start, "end": end})
        time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
        usage = Usage(service)
        results = clients.read_all(time.monotonic() + duration + 60, f"N={n}")
        cpu = usage.end(sum(r["cpu"] for r in results))
    finally:
        clients.stop()
    counts = [r["cycles"] for r in results]
    overlaps = sum(r["overlaps"] for r in results)
    if overlaps:
        raise RuntimeError(f"{NAMES[service.kind]} N={n}: {overlaps} overlapping holds seen")
    return {"rate": sum(counts) / duration, "min": min(counts) / duration,
            "max": max(counts) / duration, "cpu": cpu}


def measure_all(procs: Processes, service: Service, args: argparse.Namespace,
                flag_path: str) -> Dict[str, Dict[str, object]]:
    out: Dict[str, Dict[str, object]] = {
        "handoff": measure_handoff(procs, service, args.handoffs, args.warmup, args.hold,
                                   args.max_time)}
    for n in args.clients:
        out[f"N={n}"] = measure_cycles(procs, service, n, args.duration, flag_path)
    return out


# -- output ----------------------------------------------------------------------------

def cpu_text(cpu: Dict[str, float]) -> str:
    return (f"cpu srv {cpu['server'] * 100:3.0f}% cli {cpu['clients'] * 100:3.0f}% "
            f"other {cpu['other'] * 100:3.0f}%")


def print_round(r: int, kind: str, res: Dict[str, Dict[str, object]], clients: Sequence[int]) -> None:
    h = res["handoff"]
    print(f"round {r}  {NAMES[kind]:<11}  handoff p50 {h['p50']:6.3f} ms  p99 {h['p99']:6.3f} ms "
          f"(n={h['n']})  {cpu_text(h['cpu'])}")  # type: ignore[arg-type]
    for n in clients:
        c = res[f"N={n}"]
        print(f"round {r}  {NAMES[kind]:<11}  N={n:<3} {c['rate']:8.0f} cycles/s  per process "
              f"min {c['min']:7.1f} max {c['max']:7.1f}  {cpu_text(c['cpu'])}")  # type: ignore[arg-type]
    sys.stdout.flush()


def summarize(rounds: List[Dict[str, Dict[str, Dict[str, object]]]], clients: Sequence[int]) -> bool:
    def med(kind: str, key: str, field: str) -> float:
        return statistics.median(float(r[kind][key][field]) for r in rounds)  # type: ignore[arg-type]

    def ratio(key: str, field: str) -> Tuple[float, List[float]]:
        ratios = [float(r["dx"][key][field]) / float(r["redis"][key][field])  # type: ignore[arg-type]
                  for r in rounds]
        return statistics.median(ratios), ratios

    print()
    print(f"medians over {len(rounds)} rounds       {'distributex':>12} {'redis-lock':>12}   "
          f"dx/redis: median of paired ratios (each round)")
    ok = True
    lines = []
    for field in ("p50", "p99"):
        m, each = ratio("handoff", field)
        print(f"  handoff {field} ms              {med('dx', 'handoff', field):12.3f} "
              f"{med('redis', 'handoff', field):12.3f}   {m:5.2f}  "
              f"({', '.join(f'{x:.2f}' for x in each)})")
        if field == "p50":
            passed = m <= HANDOFF_TARGET
            ok &= passed
            lines.append(f"target handoff p50 <= Redis's (ratio <= {HANDOFF_TARGET:g}): "
                         f"{'PASS' if passed else 'FAIL'} ({m:.2f})")
    for n in clients:
        key = f"N={n}"
        m, each = ratio(key, "rate")
        print(f"  cycles/s N={n:<3}              {med('dx', key, 'rate'):12.0f} "
              f"{med('redis', key, 'rate'):12.0f}   {m:5.2f}  "
              f"({', '.join(f'{x:.2f}' for x in each)})")
        if n > 1:
            fair = {k: statistics.median(float(r[k][key]["min"]) / float(r[k][key]["max"])  # type: ignore
                                         for r in rounds) for k in ("dx", "redis")}
            print(f"    per-process min/max N={n:<3}  {fair['dx']:12.2f} {fair['redis']:12.2f}   "
                  f"(fairness: 1.00 = every process got the same share)")
        passed = m >= CYCLES_TARGET
        ok &= passed
        lines.append(f"target cycles/s N={n} >= {CYCLES_TARGET:g}x Redis's: "
                     f"{'PASS' if passed else 'FAIL'} ({m:.2f}x)")
    print()
    for line in lines:
        print(line)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="A, B rounds (default 3; --quick 2)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of each cycles/s measurement (default 10; --quick 3)")
    parser.add_argument("--handoffs", type=int, default=None,
                        help="handoffs measured per round (default 2000; --quick 500)")
    parser.add_argument("--warmup", type=int, default=50, help="handoffs before measuring (default 50)")
    parser.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                        help="the holder sleeps this long before each timed release (default 0, a hot "
                             "ping-pong; 0.3 shows what wake-ups from idle cost; mind --max-time)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], metavar="N",
                        help="process counts of the cycles/s measurements (default 1 8 32)")
    parser.add_argument("--max-time", type=float, default=120.0,
                        help="a handoff measurement that takes longer is an error (default 120 s)")
    parser.add_argument("--quick", action="store_true",
                        help="for development: 2 rounds, 3 s, 500 handoffs")
    parser.add_argument("--no-state-file", action="store_true",
                        help="distributex without its state file (state_file: null)")
    parser.add_argument("--redis-aof", action="store_true",
                        help="Redis with appendonly yes, appendfsync no (the state file's durability)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs) and print its path")
    add_quiet_option(parser)
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.handoffs = args.handoffs or (500 if args.quick else 2000)
    if args.rounds < 1 or args.duration <= 0 or args.handoffs < 1 or min(args.clients) < 1 \
            or max(args.clients) > 256 or not 0 <= args.hold <= 5:
        parser.error("rounds, duration and handoffs must be positive; clients 1..256; hold 0..5 s")
    libs = library_versions()
    # A SIGTERM unwinds like Ctrl-C, so that every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None

    with Processes(keep_dir=args.keep) as procs:
        settings: Dict[str, object] = {}
        if args.no_state_file:
            settings["state_file"] = None
        dx = Server(procs, [{"name": POOL, "expire": EXPIRE}], settings, name="dx")
        redis_proc, redis_port, redis_text = start_redis(procs, args.redis_aof)
        services = {"dx": Service("dx", dx.port, dx.pid),
                    "redis": Service("redis", redis_port, redis_proc.pid)}
        print_header("distributex against python-redis-lock: handoff latency, lock cycles/s", [
            f"distributex: in-memory backend (:{dx.port}), state file "
            + ("off" if args.no_state_file else "on") + f"; lease {EXPIRE} s",
            f"redis:   {redis_text}; {libs}; Lock(expire={EXPIRE})",
            f"clients: one Python process per client, one keep-alive connection each; "
            f"{args.rounds} rounds A (distributex), B (redis); handoff {args.handoffs} "
            f"(+{args.warmup} warm-up) between 2 processes"
            + (f", {args.hold * 1000:g} ms hold before each release" if args.hold else "")
            + f"; cycles/s for {args.duration:g} s "
            f"at N={', '.join(map(str, args.clients))}",
        ] + ([quiet] if quiet else []))
        flag_path = os.path.join(procs.dir, "overlap.flag")
        rounds = []
        for r in range(1, args.rounds + 1):
            result = {}
            for kind in ("dx", "redis"):
                result[kind] = measure_all(procs, services[kind], args, flag_path)
                print_round(r, kind, result[kind], args.clients)
            rounds.append(result)
        statuses = {"distributex": dx.stop(), "redis": procs.stop(redis_proc)}
        ok = summarize(rounds, args.clients)
        print(f"servers' exit status: {statuses}; "
              + (open("/proc/loadavg").read().split()[0] + " load average (1 min) at the end"
                 if os.path.exists("/proc/loadavg") else ""))
        if args.keep:
            print(f"logs and configs kept in {procs.dir}")
        return 0 if ok else 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
