#!/usr/bin/env python3
"""Request rate: /get/ + /release/ cycles from keep-alive clients, against a baseline.

In the same run, with the same load generator and the same requests, the
script measures

* baseline: bench/baseline_server.py, a bare twisted.web leaf resource
  answering YES with the access log off (what twisted.web costs);
* distributex, one pool per client: each client cycles /get/ then
  /release/ on its own pool as its own host (every /get/ is a grant and
  every /release/ a real release: the realistic maximum-rate case);
* distributex, one shared pool: every client cycles on the same pool
  (one holds, the others are answered NO; releases of what one does not
  hold are harmless OK).

The load generator is wrk (one thread and one keep-alive connection per
client, so that each client keeps its own host name; a Lua script
alternates the two requests and counts the answers). On a 2-core machine
the server is pinned to CPU 0 and wrk to CPU 1; the server's CPU use during
each measurement is printed, and it should be ~100 % of its core (else the
load generator, not the server, was the limit).

With --profile the script then runs the distributex server (one pool per
client) and the baseline under py-spy (sampling, low overhead; `pip install
py-spy`) or cProfile (exact call counts, slower) and prints where each
spends its time per request.

    python bench/throughput.py                          # 10 s per measurement
    python bench/throughput.py --rounds 3 --profile py-spy
    python bench/throughput.py --backend memcache       # starts its own memcached
    python bench/throughput.py --backend etcd --servers 2   # starts a 3-member etcd
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (HERE, LOOPBACK, ROOT, NPROC, Processes, Server, add_quiet_option,  # noqa: E402
                    add_server_options, busy_seconds, cpu_seconds, free_port, print_header,
                    server_settings, wait_quiet)

LUA = r"""
local threads = {}
local counter = 0
local ports = { PORTS }
local addrs = {}
for i, port in ipairs(ports) do
  addrs[i] = wrk.lookup("127.0.0.1", tostring(port))[1]
end

function setup(thread)
  thread:set("id", counter)
  -- with several servers, client i talks to server i mod N
  thread.addr = addrs[(counter % #addrs) + 1]
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local host = "client" .. id
  local pool = "p" .. id
  if args[1] == "shared" then pool = "shared" end
  reqs = { wrk.format("GET", "/get/?pool=" .. pool .. "&host=" .. host),
           wrk.format("GET", "/release/?pool=" .. pool .. "&host=" .. host) }
  n = 0
  yes = 0; no = 0; ok = 0; other = 0
end

function request()
  n = n + 1
  return reqs[2 - (n % 2)]
end

function response(status, headers, body)
  if body == "YES" then yes = yes + 1
  elseif body == "NO" then no = no + 1
  elseif body == "OK" then ok = ok + 1
  else other = other + 1 end
end

function done(summary, latency, requests)
  local y, nn, o, x = 0, 0, 0, 0
  local ymin, ymax = nil, 0
  for _, t in ipairs(threads) do
    local ty = t:get("yes")
    y = y + ty; nn = nn + t:get("no"); o = o + t:get("ok"); x = x + t:get("other")
    if ymin == nil or ty < ymin then ymin = ty end
    if ty > ymax then ymax = ty end
  end
  local e = summary.errors
  io.write(string.format(
    "DXRESULT requests=%d duration_us=%d errors=%d yes=%d no=%d ok=%d other=%d " ..
    "yes_min=%d yes_max=%d p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    y, nn, o, x, ymin or 0, ymax, latency:percentile(50), latency:percentile(99), latency.max))
end
"""

Result = Dict[str, float]


def write_lua(directory: str, ports: List[int]) -> str:
    """The wrk script for a set of servers (each client sticks to one)."""
    path = os.path.join(directory, f"cycle-{'-'.join(map(str, ports))}.lua")
    with open(path, "w") as f:
        f.write(LUA.replace("PORTS", ", ".join(map(str, ports))))
    return path


class Target:
    """What wrk loads: one or more server processes (and a memcached behind them)."""

    def __init__(self, name: str, procs: List[subprocess.Popen], ports: List[int], lua: str,
                 behind: Optional[subprocess.Popen] = None) -> None:
        self.name = name
        self.procs = procs
        self.ports = ports
        self.lua = lua
        self.behind = behind

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def behind_cpu(self) -> float:
        return cpu_seconds(self.behind.pid) if self.behind is not None else 0.0


def run_wrk(target: Target, mode: str, duration: float, clients: int,
            cpu: Optional[int]) -> Tuple[Result, float]:
    """One wrk run; its DXRESULT figures and the CPU seconds wrk used."""
    cmd = (["taskset", "-c", str(cpu)] if cpu is not None else []) + [
        "wrk", "-t", str(clients), "-c", str(clients), "-d", f"{duration:g}s",
        "--timeout", "10s", "-s", target.lua, f"http://{LOOPBACK}:{target.ports[0]}/", "--", mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + duration + 30
    out = b""
    assert proc.stdout is not None
    out = proc.stdout.read()  # wrk stops by itself after -d
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("wrk did not stop")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out.decode(errors="replace")
    m = re.search(r"DXRESULT (.*)", text)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    figures = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    return figures, usage.ru_utime + usage.ru_stime


def measure(target: Target, mode: str, args: argparse.Namespace, wrk_cpu: Optional[int]) -> Result:
    if args.warmup > 0:
        run_wrk(target, mode, args.warmup, args.clients, wrk_cpu)
    cpu0 = target.cpu()
    behind0 = target.behind_cpu()
    procs0, irq0 = busy_seconds()
    t0 = time.monotonic()
    fig, wrk_cpu_s = run_wrk(target, mode, args.duration, args.clients, wrk_cpu)
    wall = time.monotonic() - t0
    server_cpu = target.cpu() - cpu0
    behind_cpu = target.behind_cpu() - behind0
    # Whatever else ran on the machine meanwhile (other people's jobs, kernel
    # threads): if it is large the figures are noisy; run again when it is quiet.
    procs1, irq1 = busy_seconds()
    fig["other_cpu"] = max(0.0, procs1 - procs0 - server_cpu - behind_cpu - wrk_cpu_s) / wall
    fig["irq_cpu"] = (irq1 - irq0) / wall
    seconds = fig["duration_us"] / 1e6
    fig["rps"] = fig["requests"] / seconds
    fig["server_cpu"] = server_cpu / wall
    fig["wrk_cpu"] = wrk_cpu_s / wall
    fig["us_per_req"] = server_cpu / fig["requests"] * 1e6
    memcached = (f"memcached CPU {behind_cpu / wall * 100:.0f}%, " if target.behind is not None else "")
    print(f"{target.name + (', shared pool' if mode == 'shared' else ''):<32} {fig['rps']:7.0f} req/s "
          f"({fig['requests']:.0f} in {seconds:.1f} s)\n"
          f"    latency p50 {fig['p50_us'] / 1000:.2f} ms p99 {fig['p99_us'] / 1000:.2f} ms; "
          f"server CPU {fig['server_cpu'] * 100:.0f}% = {fig['us_per_req']:.0f} us/request; "
          f"wrk CPU {fig['wrk_cpu'] * 100:.0f}%, {memcached}softirq {fig['irq_cpu'] * 100:.0f}%, "
          f"other processes {fig['other_cpu'] * 100:.0f}%\n"
          f"    answers YES {fig['yes']:.0f} NO {fig['no']:.0f} OK {fig['ok']:.0f} other {fig['other']:.0f}, "
          f"socket errors {fig['errors']:.0f}; YES per client min {fig['yes_min']:.0f} "
          f"max {fig['yes_max']:.0f}")
    sys.stdout.flush()
    return fig


def start_baseline(procs: Processes, cpu: Optional[int], wrap: List[str] = ()) -> Tuple[subprocess.Popen, int]:
    port = free_port()
    script = [os.path.join(HERE, "baseline_server.py"), str(port)]
    proc = procs.spawn(list(wrap) + script if wrap else [sys.executable] + script,
                       f"baseline-{port}.log", port=port, cpu=cpu)
    return proc, port


# -- profiles --------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short_file(path: str) -> str:
    for marker in (ROOT + "/", "site-packages/", "/lib/python3"):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker):]
            return rest.split("/", 1)[1] if marker == "/lib/python3" else rest
    return os.path.basename(path)


#: The reactor's dispatch chain: every sample passes through these, so their
#: inclusive time says nothing; the inclusive list starts below them.
DISPATCH = ("_doReadOrWrite", "runUntilCurrent")
WRAPPERS = ("callWithContext", "callWithLogger", "ThreadedContextTracker.callWithContext",
            "ContextTracker.callWithContext")


def read_pyspy(path: str) -> Tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """From py-spy's raw (collapsed) output: self samples per function, inclusive
    samples per function below the reactor's dispatch, and per distributex function."""
    own: collections.Counter = collections.Counter()
    below: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = []
            for frame in stack.split(";"):
                m = FRAME.match(frame)
                frames.append((m.group("func"), short_file(m.group("file"))) if m else (frame, ""))
            own[f"{frames[-1][0]} ({frames[-1][1]})"] += n
            start = 0
            for i, (func, _) in enumerate(frames):
                if func.rsplit(".", 1)[-1] in DISPATCH:
                    start = i + 1
            if not start:  # the reactor loop itself (polling, timers' bookkeeping)
                continue
            seen = set()
            for func, file in frames[start:]:
                key = f"{func} ({file})"
                if key in seen or func.split(" ")[0] in WRAPPERS:
                    continue
                seen.add(key)
                below[key] += n
                if file.startswith("distributex/"):
                    ours[key] += n
    return own, below, ours, total


def print_pyspy(title: str, path: str, us_per_req: float, top: int) -> Dict[str, float]:
    """Print a py-spy profile; return microseconds per request by function (self time)."""
    own, below, ours, total = read_pyspy(path)
    if not total:
        print(f"{title}: no samples")
        return {}

    def show(heading: str, counter: collections.Counter) -> None:
        print(f"  {heading:<60} %    us/req")
        for fn, n in counter.most_common(top):
            print(f"    {fn[:60]:<60} {100 * n / total:5.1f} {us_per_req * n / total:6.1f}")

    print(f"\n{title}: {total} samples (busy only); server CPU {us_per_req:.0f} us per request")
    show(f"top {top} functions by self time", own)
    show(f"top {top} by inclusive time, below the reactor's dispatch", below)
    if ours:
        show("distributex functions by inclusive time", ours)
    return {fn: us_per_req * n / total for fn, n in own.items()}


def print_difference(dx: Dict[str, float], base: Dict[str, float], top: int) -> None:
    """Where distributex spends more per request than the bare resource does (self time)."""
    if not dx or not base:
        return
    diff = {fn: dx.get(fn, 0.0) - base.get(fn, 0.0) for fn in set(dx) | set(base)}
    print(f"\n  distributex minus baseline: self time in us per request, the {top} largest "
          f"differences (total {sum(dx.values()) - sum(base.values()):+.0f} us)")
    print(f"    {'function':<60} {'dx':>6} {'base':>6} {'diff':>6}")
    for fn, d in sorted(diff.items(), key=lambda kv: abs(kv[1]), reverse=True)[:top]:
        print(f"    {fn[:60]:<60} {dx.get(fn, 0.0):6.1f} {base.get(fn, 0.0):6.1f} {d:+6.1f}")


def print_cprofile(title: str, path: str, top: int) -> Dict[str, Tuple[float, float]]:
    """Print a cProfile profile; return (calls, own us) per request by function."""
    stats = pstats.Stats(path)
    # One twisted.web Request.process per request, warm-up included.
    requests = sum(v[1] for k, v in stats.stats.items()
                   if k[2] == "process" and k[0].endswith("twisted/web/server.py")) or 1
    total_calls = sum(v[1] for v in stats.stats.values())
    # Time blocked in epoll is waiting, not work.
    poll = "<method 'poll' of 'select.epoll' objects>"
    idle = sum(v[2] for k, v in stats.stats.items() if k[2] == poll)
    busy = stats.total_tt - idle
    print(f"\n{title}: {requests} requests; {total_calls / requests:.0f} function calls "
          f"per request; {busy / requests * 1e6:.0f} us of busy time per request under cProfile "
          f"(which inflates every call; compare the two servers, not the absolute figures)")

    def name(file: str, line: int, func: str) -> str:
        return f"{func} ({short_file(file)}:{line})" if line else func

    print(f"  top {top} by own time{'':<38} calls/req  us/req  cum us/req")
    rows = sorted(((k, v) for k, v in stats.stats.items() if k[2] != poll),
                  key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, func), (cc, nc, tt, ct, callers) in rows:
        print(f"    {name(file, line, func)[:58]:<58} {nc / requests:6.2f} {tt / requests * 1e6:7.1f} "
              f"{ct / requests * 1e6:8.1f}")
    ours = sorted(((k, v) for k, v in stats.stats.items()
                   if "distributex/" in k[0] and k[2] != "<module>"),
                  key=lambda kv: kv[1][3], reverse=True)[:top]
    if ours:
        print(f"  distributex functions by cumulative time{'':<19} calls/req  us/req  cum us/req")
        for (file, line, func), (cc, nc, tt, ct, callers) in ours:
            print(f"    {name(file, line, func)[:58]:<58} {nc / requests:6.2f} {tt / requests * 1e6:7.1f} "
                  f"{ct / requests * 1e6:8.1f}")
    return {name(*k): (v[1] / requests, v[2] / requests * 1e6) for k, v in stats.stats.items()
            if k[2] != poll and k[2] != "<module>"}


def print_call_difference(dx: Dict[str, Tuple[float, float]], base: Dict[str, Tuple[float, float]],
                          top: int) -> None:
    """The calls distributex makes per request that the bare resource does not."""
    if not dx or not base:
        return
    zero = (0.0, 0.0)
    names = set(dx) | set(base)
    total = sum(v[0] for v in dx.values()) - sum(v[0] for v in base.values())
    print(f"\n  distributex minus baseline: function calls per request (total {total:+.0f}), "
          f"the {top} largest differences, with their own time under cProfile")
    print(f"    {'function':<58} {'calls':>7} {'own us':>7}")
    rows = sorted(names, key=lambda n: abs(dx.get(n, zero)[0] - base.get(n, zero)[0]), reverse=True)
    for n in rows[:top]:
        print(f"    {n[:58]:<58} {dx.get(n, zero)[0] - base.get(n, zero)[0]:+7.2f} "
              f"{dx.get(n, zero)[1] - base.get(n, zero)[1]:+7.1f}")


def profile(args: argparse.Namespace, procs: Processes, settings: dict, pools: List[dict],
            server_cpu: Optional[int], wrk_cpu: Optional[int]) -> None:
    tool = args.profile
    print(f"\n== profile ({tool}), {args.profile_duration:g} s of load, one pool per client")
    if tool == "py-spy" and not shutil.which("py-spy"):
        print("py-spy is not installed (pip install py-spy); skipped")
        return
    inclusive: Dict[str, Dict[str, float]] = {}
    calls: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for name in ("distributex", "baseline"):
        if tool == "cprofile":
            out = os.path.join(procs.dir, f"{name}.prof")
            wrap = [sys.executable, "-m", "cProfile", "-o", out]
        else:
            wrap = []
        if name == "distributex":
            server = Server(procs, pools, settings, name="dx-prof", access_log=args.access_log,
                            cpu=server_cpu, wrap=wrap)
            proc, port = server.proc, server.port
        else:
            proc, port = start_baseline(procs, server_cpu, wrap)
        target = Target(name, [proc], [port], write_lua(procs.dir, [port]))
        run_wrk(target, "per-client", 1, args.clients, wrk_cpu)  # warm-up
        if tool == "py-spy":
            out = os.path.join(procs.dir, f"{name}.pyspy")
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--duration", f"{args.profile_duration:g}",
                 "--rate", "1000", "--nonblocking", "--function", "--full-filenames",
                 "--format", "raw", "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
        cpu0 = cpu_seconds(proc.pid)
        fig, _ = run_wrk(target, "per-client", args.profile_duration, args.clients, wrk_cpu)
        used = cpu_seconds(proc.pid) - cpu0
        if tool == "py-spy":
            try:
                _, err = spy.communicate(timeout=args.profile_duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        procs.stop(proc)
        rps = fig["requests"] / (fig["duration_us"] / 1e6)
        print(f"{name}: {rps:.0f} req/s while profiled")
        if tool == "py-spy":
            if not os.path.exists(out):
                print(f"py-spy failed: {err.decode(errors='replace').strip()[-500:]}")
                continue
            inclusive[name] = print_pyspy(f"{name} (py-spy)", out, used / fig["requests"] * 1e6, args.top)
        else:
            calls[name] = print_cprofile(f"{name} (cProfile)", out, args.top)
    if len(inclusive) == 2:
        print_difference(inclusive["distributex"], inclusive["baseline"], args.top)
    if len(calls) == 2:
        print_call_difference(calls["distributex"], calls["baseline"], args.top + 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure baseline, distributex, shared pool this many times, interleaved")
    parser.add_argument("--clients", type=int, default=32, help="keep-alive clients (default 32)")
    parser.add_argument("--servers", type=int, default=1,
                        help="distributex servers sharing the backend (needs --backend memcache or etcd); "
                             "client i talks to server i mod N")
    parser.add_argument("--no-shared", action="store_true", help="skip the shared-pool measurement")
    parser.add_argument("--state-file", choices=("both", "on", "off"), default="both",
                        help="in-memory backend: measure with the state file on, off, or both "
                             "interleaved (default both; the 90%% target is judged with it off "
                             "when both are measured)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the server to CPU 0 and wrk to CPU 1")
    parser.add_argument("--profile", choices=("none", "py-spy", "cprofile"), default="none",
                        help="afterwards, profile the distributex server and the baseline")
    parser.add_argument("--profile-duration", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=15, help="functions to list in a profile")
    add_quiet_option(parser)
    add_server_options(parser)
    args = parser.parse_args()
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    if not 1 <= args.clients <= 1000:
        parser.error("--clients must be 1..1000")
    # Two cores: the server gets one, wrk the other. Several servers (and a
    # memcached) cannot be given a core each, so then nothing is pinned.
    pin = not args.no_pin and NPROC >= 2 and args.servers == 1
    server_cpu, wrk_cpu = (0, 1) if pin else (None, None)

    with Processes(keep_dir=args.keep) as procs:
        settings = server_settings(args, procs)
        if args.servers > 1 and settings.get("backend") not in ("memcache", "etcd"):
            parser.error("--servers above 1 needs a shared backend: --backend memcache or etcd")
        pools = [{"name": f"p{i}", "expire": 300} for i in range(args.clients)]
        pools.append({"name": "shared", "expire": 300})
        in_memory = settings.get("backend", "inmemory") == "inmemory"
        modes = ["off", "on"] if args.state_file == "both" else [args.state_file]
        if not in_memory:
            modes = ["store"]
        servers = []
        targets: Dict[str, Target] = {}
        for mode in modes:
            mode_settings = dict(settings, state_file=None) if mode == "off" else settings
            group = [Server(procs, pools, mode_settings, name=f"dx{i}-{mode}", access_log=args.access_log,
                            cpu=server_cpu) for i in range(args.servers)]
            servers += group
            ports = [s.port for s in group]
            name = "distributex" if args.servers == 1 else f"distributex x{args.servers}"
            if in_memory:
                name += f", state file {mode}"
            targets[mode] = Target(name, [s.proc for s in group], ports, write_lua(procs.dir, ports),
                                   procs.memcached)
        ports = [s.port for s in servers]
        base_proc, base_port = start_baseline(procs, server_cpu)
        base = Target("baseline (bare twisted.web)", [base_proc], [base_port],
                      write_lua(procs.dir, [base_port]))
        print_header("distributex throughput: /get/ + /release/ cycles, keep-alive", [
            f"backend: {settings.get('backend', 'inmemory')}"
            + (f" {settings.get('memcache_servers')}" if settings.get("backend") == "memcache" else "")
            + f"; {args.servers} distributex server(s) on {', '.join(map(str, ports))}"
            + f"; access log {'on' if args.access_log else 'off'}",
            f"load: wrk, {args.clients} connections (one thread each, client i has host clienti and "
            f"pool pi), {args.duration:g} s per measurement after {args.warmup:g} s warm-up, "
            f"{args.rounds} round(s); " + ("server on CPU 0, wrk on CPU 1" if pin else "not pinned"),
        ] + ([quiet] if quiet else []))
        results: Dict[str, List[Result]] = collections.defaultdict(list)
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"-- round {r + 1}")
            results["baseline"].append(measure(base, "per-client", args, wrk_cpu))
            for mode, dx in targets.items():
                results[f"per-client {mode}"].append(measure(dx, "per-client", args, wrk_cpu))
                if not args.no_shared:
                    results[f"shared {mode}"].append(measure(dx, "shared", args, wrk_cpu))
        exits = [s.stop() for s in servers]
        procs.stop(base_proc)

        def median(values: List[float]) -> float:
            v = sorted(values)
            return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

        def rps(key: str) -> float:
            return median([f["rps"] for f in results[key]])

        def cost(key: str) -> float:
            return median([f["us_per_req"] for f in results[key]])

        print(f"\nsummary (median of {args.rounds} round(s); distributex exit status {exits})")
        b = rps("baseline")
        print(f"  {'baseline (bare twisted.web):':<34} {b:7.0f} req/s, {cost('baseline'):4.0f} us of server "
              f"CPU per request")
        ratios: Dict[str, float] = {}
        for mode, dx in targets.items():
            for key, label in ((f"per-client {mode}", f"{dx.name}, pool per client:"),
                               (f"shared {mode}", f"{dx.name}, one shared pool:")):
                if results[key]:
                    print(f"  {label:<50} {rps(key):7.0f} req/s, {cost(key):4.0f} us of server CPU per "
                          f"request: {100 * rps(key) / b:5.1f}% of baseline")
            # Each round measures the baseline and then distributex, seconds
            # apart: the ratio within a round cancels the slow drifts of a
            # shared or virtual machine, so the target is judged on its median.
            key = f"per-client {mode}"
            paired = [d["rps"] / b_["rps"] for b_, d in zip(results["baseline"], results[key])]
            ratios[mode] = median(paired)
            if len(paired) > 1:
                print(f"  paired rounds ({dx.name}, pool per client / the baseline of the same round): "
                      f"median {100 * ratios[mode]:.1f}% (rounds: {', '.join(f'{100 * x:.0f}%' for x in paired)})")
            # CPU per request is steadier than req/s when other work shares the
            # machine: at 100 % of a core the rate would be 1 / cost.
            if args.servers == 1:
                print(f"  by server CPU per request (steadier on a busy machine): {dx.name} (pool per "
                      f"client) would reach {100 * cost('baseline') / cost(key):.1f}% of the "
                      f"baseline's rate")
        # The 90 % target is the server's own cost, so it is judged with the
        # state file off when both were measured; with it on the aim is 85 %.
        judged = "off" if "off" in ratios else next(iter(ratios))
        ratio = ratios[judged]
        if in_memory:
            print(f"  target distributex >= 90% of baseline (pool per client, state file {judged}, median "
                  f"of the paired rounds): {'PASS' if ratio >= 0.9 else 'FAIL'} ({100 * ratio:.1f}%)")
            if "on" in ratios:
                print(f"  aim with the state file on >= 85%: {'met' if ratios['on'] >= 0.85 else 'missed'} "
                      f"({100 * ratios['on']:.1f}%)")
        else:
            print("  (the 90% target is the in-memory backend's; a shared backend adds a store "
                  "round trip per request)")
        if len(results["baseline"]) > 1:
            print("  spread over the rounds (min..max req/s): " + "; ".join(
                f"{k} {min(f['rps'] for f in v):.0f}..{max(f['rps'] for f in v):.0f}"
                for k, v in results.items() if v))
        others = max(f["other_cpu"] for rs in results.values() for f in rs)
        if others > 0.15:
            print(f"  NOTE: other processes used up to {others * 100:.0f}% of a CPU during a "
                  f"measurement; the figures are noisy")
        bad = sum(f["other"] + f["errors"] for rs in results.values() for f in rs)
        if bad:
            print(f"  WARNING: {bad:.0f} unexpected answers or socket errors")

        if args.profile != "none":
            profile(args, procs, dict(settings, state_file=None) if judged == "off" else settings,
                    pools, server_cpu, wrk_cpu)
        if args.keep:
            print(f"logs and configs kept in {procs.dir}")
        return 0 if (ratio >= 0.9 or not in_memory) and not bad else 2


if __name__ == "__main__":
    sys.exit(main())
