"""Chaos run: the lock service never grants twice and tokens never go back,
while servers, memcacheds and clients are killed and paused at random.

    python bench/chaos.py [--duration 600] [--clients 30] [--seed N] [--expire 3] [--keep]
    python bench/chaos.py --short                 # 60 s, for a quick check
    python bench/chaos.py --check DIR             # the checker again, on a kept run

Run by hand from the project root with the package installed; not part of
the test suite. Exit status 0: no violation; 1: a violation (printed with
its evidence); 2: the run itself could not be made (a server did not start).

The topology, all on 127.0.0.1 and free ports:

- two memcached (``-M``: never evict);
- three ``twistd -n distributex`` on the memcache backend with
  ``memcache_servers`` = both memcacheds, each in its own working directory
  with its own ``--pidfile`` (as an operator runs them: a restart after
  kill -9 meets the stale pidfile);
- one ``twistd -n distributex`` on the in-memory backend with
  ``state_file: WORKDIR/distributex.state`` (holds and tokens survive
  kill -9); ``--no-inmemory`` leaves it out.

Pools (lease ``--expire``, 3 s by default): on the memcache servers two
mutexes (maxlocks 1), named so that one lives on each memcached, and one
semaphore (maxlocks 2); on the in-memory server two mutexes.

``--clients`` threads each loop the real ``distributex`` wrapper::

    distributex -H 127.0.0.1 -p PORT -r POOL -t 20 -g 0.5 --id cNNrMMMM \\
        -- python -S bench/chaos_record.py RUNDIR HOLD

on a random pool, through a random one of the three memcache servers (or
the in-memory server for its pools). The command (bench/chaos_record.py) is
the critical section: it records its token and its interval, holds for 50 to
500 ms (one run in 25 holds 1.5 to 2.5 leases, so that renewals are
exercised and a killed wrapper's command outlives its lease), and ends with
a write to a fenced resource that refuses a token lower than the highest it
has accepted.

The chaos, for ``--duration`` seconds, one event every 2.5 s on average, at
most three at a time, never two on one target:

- ``kill-dx``: kill -9 a distributex server, restart it after 0 to 2 s;
- ``stop-dx``: SIGSTOP a distributex server for 1 to 4 s, then SIGCONT;
- ``kill-client``: kill -9 a wrapper (most often one whose command runs);
  its command, in its own process group, is left running, as a crashed
  client leaves it: nobody renews the lease, which ends on the server while
  the command may still run;
- ``stop-client``: SIGSTOP a wrapper's process group and its command's for
  1 to 5 s (a paused VM);
- ``kill-memcached``: kill -9 a memcached, restart it after 0.2 to 3 s
  (its data is lost: the contract's lock-delay applies);
- ``power-cut``: kill -9 a memcached and a memcache distributex server at
  the same moment, restart both.

Every loop is bounded in count and in time; every process started is
killed at the end, also on Ctrl-C or an error (orphaned commands too: the
script makes itself their subreaper, so it can reap and kill them by pid).

What the checker says, per pool (sections sorted by start; a section is
[command start, fenced write done], all times ``time.monotonic()``):

(a) ACCEPTED OVERLAPS: at some moment more than maxlocks sections whose
    writes the resource accepted. Expected only when the lower-token
    section(s) had lost their lease through no fault of the service: the
    wrapper was killed before the section ended (an orphaned command: the
    lease ends on the server, nothing stops the command, and the fence is
    what protects the resource; when the orphan writes before the new
    holder, both writes pass), or the client was paused for at least two
    thirds of a lease (the renewal interval is a third: a shorter pause
    cannot outlast a lease), or it was paused as its lease ran out after an
    outage of its server or of the store (an etcd member, a memcached)
    within that lease had kept its renewals from getting through. Those are listed as explained, unless the
    servers' own /status/ (probed by each section at its start and before
    its write) showed more than maxlocks leases live at that moment; any
    other is a VIOLATION.
(b) TOKEN REGRESSIONS: a section that started after another ended carries
    a lower or equal token. A VIOLATION when the tokens are equal (one
    token, two grants), when the later section's wrapper was started only
    after the earlier section had begun (so its grant certainly came later),
    or, in a mutex, when nothing delayed the later section between its
    grant and its start (a client pause, a pause or kill of the server it
    asked). In a semaphore two holders may be granted in one order and
    start in the other; there the servers' /status/ (probed by each section
    at its start) dates the grants.
(c) FENCED REFUSALS: writes the resource refused (an older holder, after a
    pause or an orphaned command). Not a failure: fencing doing its job.
(d) CAUGHT OVERLAPS: more than maxlocks sections at once, where the extra
    ones were refused by the fence or stopped by their wrapper (lock lost)
    or never finished. Explained like (a); an UNEXPLAINED one is a double
    grant the fence or the client happened to contain: a VIOLATION too
    (guarantee 1 is about holding, not about what the resource accepted).
(e) LOCK-DELAY: after a memcached restart, its pools must grant nothing for
    a whole lease (contract, guarantee 6). A section whose wrapper started
    after the memcached was back, in a pool whose record that memcached
    lost with live holders, and that began within a lease of the restart
    is a VIOLATION.

Every violation is printed with its sections, what the servers' /status/
said of them (a section that the server did not list as a holder of its
pool when it started ran on a grant that was no live hold), their
wrappers' stderr, the chaos events near them, and the server log lines
about them (the holder is the run's id, ``--id cNNrMMMM``). The wrapper
runs are summed up by exit status and stderr message; a wrapper that gave
up at once on ``ERROR`` (503) before a grant, or printed a traceback, is
reported as a finding (contract, section 7).

``--keep`` keeps the run's directory (a failed run is always kept):
``meta.json``, ``events.jsonl`` (the chaos), ``runs.jsonl`` (every wrapper
run), ``records/`` (the sections), ``resource/`` (the fenced files and
their logs), ``servers/*/`` (configs, state file, pidfile, logs).
``--check DIR`` runs the checker on it again. To test a tree other than
the installed one, put it first in ``PYTHONPATH``: the servers, the
wrapper and their restarts all import it.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import LOOPBACK, free_port, print_header, python_script  # noqa: E402

RECORDER = os.path.join(HERE, "chaos_record.py")
MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
NAMESPACE = "distributex"

#: The wrapper's -t: long enough to wait out a lock-delay and a queue of
#: short holds, short enough that a run stuck behind a dead server ends.
WAIT_TIMEOUT = 20.0
#: The wrapper's -g: SIGKILL this long after SIGTERM on a lost lock.
KILL_GRACE = 0.5
#: Hold times of an ordinary section (seconds).
HOLD = (0.05, 0.5)
#: One run in LONG_EVERY holds LONG_HOLD leases: renewals under chaos, and
#: orphaned commands that outlive their lease.
LONG_EVERY = 25
LONG_HOLD = (1.5, 2.5)
#: A client pause at least this share of a lease can outlast it (the wrapper
#: renews every third of a lease); a shorter one explains nothing.
PAUSE_EXPLAINS = 2 / 3
#: Chaos that stops a client's renewals from getting through: the store (an
#: etcd member, the leader among them, or a memcached) down or paused.
STORE_OUTAGES = ("kill-etcd", "kill-etcd-leader", "stop-etcd", "kill-memcached", "power-cut")
#: A client paused within this long before its lease ran out could not act on it.
PAUSED_AT_END = 0.5
#: Mean seconds between chaos events, and how many may run at once.
CHAOS_INTERVAL = 2.5
MAX_CONCURRENT_EVENTS = 3
#: Durations (seconds) of the chaos events.
DX_DOWN = (0.0, 2.0)
DX_STOP = (1.0, 4.0)
CLIENT_STOP = (1.0, 5.0)
MC_DOWN = (0.2, 3.0)
#: Relative weights of the chaos events.
WEIGHTS = {"kill-dx": 3, "stop-dx": 3, "kill-client": 3, "stop-client": 3,
           "kill-memcached": 1.5, "power-cut": 0.5}
#: Seconds a server may take to listen again after a restart.
START_TIMEOUT = 20.0
#: Runs per client at most (a bound; the duration ends them long before).
MAX_RUNS = 100000
#: How much later than /status/ may date one grant than another and still
#: be taken as the same instant (the probes' own delays).
DATING_SLACK = 0.05


# -- processes -------------------------------------------------------------------

def become_subreaper() -> bool:
    """Orphaned commands (their wrapper killed) become our children: they
    can be reaped, and killed by pid at the end without fear of pid reuse."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def children_of(pid: int) -> List[int]:
    out: List[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> Optional[str]:
    """None once something listens on ``port``; else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return None
        except OSError:
            time.sleep(0.02)
    return f"not listening after {timeout:g} s"


def tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError:
        return ""


class Managed:
    """A server process that chaos may kill, pause and start again on its port."""

    def __init__(self, name: str, kind: str, port: int, args: List[str], cwd: str,
                 closing: threading.Event, pidfile: Optional[str] = None) -> None:
        self.name = name
        self.closing = closing  # once set, nothing starts again (a chaos step that outlives the run)
        self.life = threading.Lock()  # a start and the final stop never cross
        self.kind = kind  # memcached | dx-memcache | dx-inmemory
        self.port = port
        self.args = args
        self.cwd = cwd
        self.pidfile = pidfile
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.proc: Optional[subprocess.Popen] = None
        self.busy = threading.Lock()  # one chaos event at a time on this target
        self.stopped = False
        self.starts = 0
        self.notes: List[str] = []  # restarts that needed help, for the report

    def start(self) -> None:
        """Start and wait until it listens; RuntimeError if it does not."""
        why = self._start_once()
        if why and self.pidfile and "Another twistd server is running" in tail(self.log_path, 3):
            # kill -9 left the pidfile, and its pid now belongs to another
            # process: twistd refuses to start. An operator removes it.
            self.notes.append(f"restart refused by twistd (stale pidfile, pid reused): {tail(self.log_path, 1)}")
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
            why = self._start_once()
        if why:
            raise RuntimeError(f"{self.name} {why}: {tail(self.log_path)}")

    def _start_once(self) -> Optional[str]:
        with self.life:
            if self.closing.is_set():
                return "not started again: the run is ending"
            return self._spawn()

    def _spawn(self) -> Optional[str]:
        with open(self.log_path, "ab") as log:
            log.write(f"=== chaos: start at {time.monotonic():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        self.stopped = False
        return wait_for_port(self.port, self.proc, START_TIMEOUT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stopped = False

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM (SIGKILL after ``timeout``); the exit status."""
        with self.life:
            self.closing.set()
            if self.proc is None or self.proc.poll() is not None:
                return None  # already dead (killed by chaos): no exit status to judge
            if self.proc.poll() is None:
                self.resume()
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode


def memcached_get(port: int, keys: Sequence[str], timeout: float = 1.0) -> Dict[str, bytes]:
    """The values of ``keys`` in the memcached on ``port`` (text protocol)."""
    out: Dict[str, bytes] = {}
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(("get " + " ".join(keys) + "\r\n").encode())
        buf = b""
        while not buf.endswith(b"END\r\n"):
            data = s.recv(65536)
            if not data:
                break
            buf += data
    while buf.startswith(b"VALUE "):
        head, _, rest = buf.partition(b"\r\n")
        _, key, _, size = head.split()[:4]
        out[key.decode()] = rest[:int(size)]
        buf = rest[int(size) + 2:]
    return out


# -- the harness -----------------------------------------------------------------

class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = tempfile.mkdtemp(prefix="dx-chaos-")
        for sub in ("records", "resource", "err", "servers"):
            os.makedirs(os.path.join(self.dir, sub))
        self.t0 = time.monotonic()
        self.memcacheds: List[Managed] = []
        self.dx_memcache: List[Managed] = []
        self.dx_inmemory: Optional[Managed] = None
        self.pools: Dict[str, Dict[str, Any]] = {}  # name -> {maxlocks, expire, backend}
        self.clients: List[Client] = []
        self.stop_chaos = threading.Event()
        self.closing = threading.Event()
        self.stop_clients = threading.Event()
        self.interrupted = False
        self.events: List[Dict[str, Any]] = []
        self.events_lock = threading.Lock()
        self.runs_lock = threading.Lock()
        self.runs_file = open(os.path.join(self.dir, "runs.jsonl"), "a")
        self.orphans: Dict[int, str] = {}  # pid of a command whose wrapper was killed -> run
        self.orphans_lock = threading.Lock()
        self.event_threads: List[threading.Thread] = []
        self.event_slots = threading.Semaphore(MAX_CONCURRENT_EVENTS)
        self.chaos_errors: List[str] = []
        self.exit_statuses: Dict[str, Optional[int]] = {}

    # -- set-up ------------------------------------------------------------------

    def start_servers(self) -> None:
        expire = self.args.expire
        for i in range(2):
            port = free_port()
            cmd = [MEMCACHED, "-l", LOOPBACK, "-p", str(port), "-U", "0", "-M", "-m", "64"]
            if os.geteuid() == 0:
                cmd += ["-u", "root"]
            workdir = os.path.join(self.dir, "servers", f"memcached{i + 1}")
            os.makedirs(workdir)
            m = Managed(f"memcached{i + 1}", "memcached", port, cmd, workdir, self.closing)
            m.start()
            self.memcacheds.append(m)
        mutexes = pool_names_by_memcached([m.port for m in self.memcacheds])
        for name in mutexes:
            self.pools[name] = {"maxlocks": 1, "expire": expire, "backend": "memcache"}
        self.pools["msem"] = {"maxlocks": 2, "expire": expire, "backend": "memcache"}
        memcache_servers = [f"{LOOPBACK}:{m.port}" for m in self.memcacheds]
        twistd = python_script("twistd")
        for i in range(3):
            config = {"backend": "memcache", "memcache_servers": memcache_servers,
                      "pools": self._pool_config("memcache")}
            self.dx_memcache.append(self._dx(f"dx{i + 1}", "dx-memcache", config, twistd))
        if not self.args.no_inmemory:
            for name in ("im-a", "im-b"):
                self.pools[name] = {"maxlocks": 1, "expire": expire, "backend": "inmemory"}
            workdir = os.path.join(self.dir, "servers", "dxmem")
            config = {"backend": "inmemory", "state_file": os.path.join(workdir, "distributex.state"),
                      "pools": self._pool_config("inmemory")}
            try:
                self.dx_inmemory = self._dx("dxmem", "dx-inmemory", config, twistd)
            except RuntimeError as e:
                raise SystemExit(f"the in-memory server with state_file did not start ({e}); "
                                 "without the state_file key, run with --no-inmemory")

    def _pool_config(self, backend: str) -> List[Dict[str, Any]]:
        return [{"name": n, "expire": p["expire"], "maxlocks": p["maxlocks"]}
                for n, p in self.pools.items() if p["backend"] == backend]

    def _dx(self, name: str, kind: str, config: Dict[str, Any], twistd: str) -> Managed:
        workdir = os.path.join(self.dir, "servers", name)
        os.makedirs(workdir, exist_ok=True)
        config_path = os.path.join(workdir, "distributex.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
        port = free_port()
        pidfile = os.path.join(workdir, "twistd.pid")
        args = [twistd, "-n", f"--pidfile={pidfile}", "distributex", "-c", config_path,
                "--listen", f"tcp:{port}:interface={LOOPBACK}"]
        server = Managed(name, kind, port, args, workdir, self.closing, pidfile=pidfile)
        server.start()
        return server

    def servers(self) -> List[Managed]:
        return self.dx_memcache + ([self.dx_inmemory] if self.dx_inmemory else [])

    def everything(self) -> List[Managed]:
        return self.memcacheds + self.servers()

    def save_meta(self) -> None:
        meta = {
            "t0": self.t0, "expire": self.args.expire, "duration": self.args.duration,
            "clients": self.args.clients, "seed": self.args.seed, "pools": self.pools,
            "servers": {s.name: {"kind": s.kind, "port": s.port, "log": s.log_path}
                        for s in self.everything()},
            "subreaper": self.subreaper,
        }
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    # -- records -------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def record_run(self, run: Dict[str, Any]) -> None:
        with self.runs_lock:
            self.runs_file.write(json.dumps(run) + "\n")
            self.runs_file.flush()

    def record_event(self, event: Dict[str, Any]) -> None:
        with self.events_lock:
            self.events.append(event)
            with open(os.path.join(self.dir, "events.jsonl"), "a") as f:
                f.write(json.dumps(event) + "\n")

    # -- chaos -----------------------------------------------------------------------

    def chaos_loop(self) -> None:
        deadline = self.t0 + self.args.duration
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        while not self.stop_chaos.is_set() and self.now() < deadline:
            pause = min(3 * CHAOS_INTERVAL, max(0.3, self.rng.expovariate(1 / CHAOS_INTERVAL)))
            if self.stop_chaos.wait(pause):
                break
            self.reap_orphans()
            if not self.event_slots.acquire(blocking=False):
                continue
            kind = self.rng.choices(kinds, weights)[0]
            seed = self.rng.random()
            t = threading.Thread(target=self._event, args=(kind, seed), daemon=True, name=kind)
            self.event_threads = [x for x in self.event_threads if x.is_alive()] + [t]
            t.start()
        for t in self.event_threads:
            t.join(60)

    def _event(self, kind: str, seed: float) -> None:
        rng = random.Random(seed)
        try:
            getattr(self, "_" + kind.replace("-", "_"))(rng)
        except Exception as e:  # a chaos step that failed is reported, the run goes on
            if not self.closing.is_set():
                self.chaos_errors.append(f"{kind}: {type(e).__name__}: {e}")
        finally:
            self.event_slots.release()

    def _take(self, candidates: Sequence[Managed], rng: random.Random) -> Optional[Managed]:
        candidates = list(candidates)
        rng.shuffle(candidates)
        for c in candidates:
            if c.busy.acquire(blocking=False):
                return c
        return None

    def _sleep(self, seconds: float) -> None:
        # Chaos ends early on Ctrl-C; what was paused or killed is still put back.
        self.stop_chaos.wait(seconds) if self.interrupted else time.sleep(seconds)

    def _kill_dx(self, rng: random.Random) -> None:
        server = self._take(self.servers(), rng)
        if server is None:
            return
        try:
            down = rng.uniform(*DX_DOWN)
            t = self.now()
            server.kill9()
            self._sleep(down)
            server.start()
            self.record_event({"kind": "kill-dx", "target": server.name, "t": t, "t_end": self.now(),
                               "detail": {"down": round(down, 3), "port": server.port}})
        finally:
            server.busy.release()

    def _stop_dx(self, rng: random.Random) -> None:
        server = self._take(self.servers(), rng)
        if server is None:
            return
        try:
            length = rng.uniform(*DX_STOP)
            t = self.now()
            server.pause()
            self._sleep(length)
            server.resume()
            self.record_event({"kind": "stop-dx", "target": server.name, "t": t, "t_end": self.now(),
                               "detail": {"port": server.port}})
        finally:
            server.busy.release()

    def _kill_memcached(self, rng: random.Random, with_dx: bool = False) -> None:
        mc = self._take(self.memcacheds, rng)
        if mc is None:
            return
        dx = self._take(self.dx_memcache, rng) if with_dx else None
        if with_dx and dx is None:
            mc.busy.release()
            return
        try:
            down = rng.uniform(*MC_DOWN)
            lost = self.memcached_snapshot(mc)
            t = self.now()
            mc.kill9()
            if dx is not None:
                dx.kill9()
            self._sleep(down)
            mc.start()
            up = self.now()
            if dx is not None:
                dx.start()
            self.record_event({"kind": "power-cut" if with_dx else "kill-memcached",
                               "target": mc.name + (f"+{dx.name}" if dx else ""), "t": t,
                               "t_end": self.now(),
                               "detail": {"down": round(down, 3), "up": up, "lost": lost}})
        finally:
            mc.busy.release()
            if dx is not None:
                dx.busy.release()

    def _power_cut(self, rng: random.Random) -> None:
        self._kill_memcached(rng, with_dx=True)

    def memcached_snapshot(self, mc: Managed) -> Dict[str, Any]:
        """What the memcached holds before it dies: the epoch, the pool records, their live holders."""
        keys = [f"{NAMESPACE}:pool:{p}" for p, spec in self.pools.items() if spec["backend"] == "memcache"]
        try:
            values = memcached_get(mc.port, keys + [f"{NAMESPACE}:epoch"])
        except OSError as e:
            return {"error": str(e)}
        now = time.time()
        pools = {}
        for key, raw in values.items():
            if key.endswith(":epoch"):
                continue
            try:
                record = json.loads(raw)
                holders = [{"host": h[0], "token": h[2], "expires_in": None if h[4] is None else round(h[4] - now, 3)}
                           for h in record.get("h", [])]
            except (ValueError, IndexError, TypeError, AttributeError):
                holders = [{"unparsed": raw[:200].decode(errors="replace")}]
            pools[key.rsplit(":", 1)[1]] = {
                "holders": [h for h in holders if h.get("expires_in") is None or h["expires_in"] > 0],
                "queued": (record.get("seq", 0) - record.get("lo", 0) - len(record.get("x", [])) - record.get("nt", 0)
                           if isinstance(record, dict) else None)}
        return {"epoch": f"{NAMESPACE}:epoch" in values, "pools": pools}

    def _kill_client(self, rng: random.Random) -> None:
        client = self._pick_client(rng, prefer_holding=rng.random() < 0.7)
        if client is None:
            return
        with client.lock:
            proc, run = client.proc, client.run_id
            if proc is None or proc.poll() is not None:
                return
            commands = children_of(proc.pid)
            t = self.now()
            proc.kill()
            client.killed = True
        with self.orphans_lock:
            for pid in commands:
                self.orphans[pid] = run
        self.record_event({"kind": "kill-client", "target": run, "t": t, "t_end": t,
                           "detail": {"wrapper": proc.pid, "commands_left_running": commands}})

    def _stop_client(self, rng: random.Random) -> None:
        client = self._pick_client(rng, prefer_holding=rng.random() < 0.7)
        if client is None:
            return
        length = rng.uniform(*CLIENT_STOP)
        with client.lock:
            proc, run = client.proc, client.run_id
            if proc is None or proc.poll() is not None:
                return
            groups = [proc.pid] + children_of(proc.pid)
            t = self.now()
            for g in groups:
                try:
                    os.killpg(g, signal.SIGSTOP)
                except OSError:
                    pass
            client.paused = True
        try:
            self._sleep(length)
        finally:
            with client.lock:
                for g in groups:
                    try:
                        os.killpg(g, signal.SIGCONT)
                    except OSError:
                        pass
                client.paused = False
        self.record_event({"kind": "stop-client", "target": run, "t": t, "t_end": self.now(),
                           "detail": {"groups": groups, "holding": len(groups) > 1}})

    def _pick_client(self, rng: random.Random, prefer_holding: bool) -> Optional["Client"]:
        live = [c for c in self.clients if c.proc is not None and c.proc.poll() is None and not c.paused]
        if prefer_holding:
            holding = [c for c in live if c.proc is not None and children_of(c.proc.pid)]
            live = holding or live
        return rng.choice(live) if live else None

    def reap_orphans(self) -> None:
        with self.orphans_lock:
            for pid in list(self.orphans):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid  # not ours (no subreaper): nothing to reap
                if done:
                    del self.orphans[pid]

    # -- the run -----------------------------------------------------------------------

    def run(self) -> None:
        self.subreaper = become_subreaper()
        self.start_servers()
        self.save_meta()
        for i in range(self.args.clients):
            self.clients.append(Client(self, i, random.Random(f"{self.args.seed}-{i}")))
        for c in self.clients:
            c.start()
        self.chaos_loop()

    def wind_down(self) -> None:
        """Put every server back, let the runs under way end, then stop everything."""
        self.stop_chaos.set()
        for t in self.event_threads:
            t.join(0 if self.interrupted else 60)
        for s in self.everything():
            try:
                s.resume()
                if not s.alive and not self.interrupted:
                    s.start()
            except RuntimeError as e:
                self.chaos_errors.append(f"restart at the end: {e}")
        self.stop_clients.set()
        if not self.interrupted:
            deadline = time.monotonic() + WAIT_TIMEOUT + LONG_HOLD[1] * self.args.expire + 10
            for c in self.clients:
                c.join(max(0.0, deadline - time.monotonic()))
        self.kill_clients()

    def kill_clients(self) -> None:
        self.stop_clients.set()
        for c in self.clients:
            c.kill()
        for c in self.clients:
            c.join(10)
        with self.orphans_lock:
            for pid in list(self.orphans):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:  # still ours and alive
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                except (ChildProcessError, ProcessLookupError):
                    pass
                del self.orphans[pid]

    def stop_servers(self) -> None:
        for s in self.servers():
            self.exit_statuses[s.name] = s.terminate()
        for m in self.memcacheds:
            m.terminate(5)
        self.runs_file.close()


class Client(threading.Thread):
    """One client machine: loops of the real wrapper, one run at a time."""

    def __init__(self, harness: Harness, index: int, rng: random.Random) -> None:
        super().__init__(daemon=True, name=f"client{index}")
        self.h = harness
        self.index = index
        self.rng = rng
        self.lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None
        self.run_id = ""
        self.killed = False
        self.paused = False
        self.dx = python_script("distributex")
        self.python = sys.executable

    def run(self) -> None:
        pools = sorted(self.h.pools)
        for n in range(MAX_RUNS):
            if self.h.stop_clients.is_set() or time.monotonic() > self.h.t0 + self.h.args.duration:
                return
            try:
                self.one_run(n, pools)
            except Exception as e:  # e.g. the wrapper reinstalled under our feet: say it, go on
                self.h.record_run({"run": f"c{self.index:02d}r{n:04d}", "pool": "", "server": "",
                                   "port": 0, "launch": time.monotonic(), "end": time.monotonic(),
                                   "rc": None, "hold": 0, "killed": False, "hung": False,
                                   "stderr": "", "error": f"{type(e).__name__}: {e}"[:300]})
                if self.h.stop_clients.wait(1.0):
                    return
            if self.h.stop_clients.wait(self.rng.uniform(0, 0.2)):
                return

    def one_run(self, n: int, pools: List[str]) -> None:
        h = self.h
        pool = self.rng.choice(pools)
        if h.pools[pool]["backend"] == "memcache":
            server = self.rng.choice(h.dx_memcache)
        else:
            assert h.dx_inmemory is not None
            server = h.dx_inmemory
        expire = h.pools[pool]["expire"]
        if self.rng.randrange(LONG_EVERY) == 0:
            hold = self.rng.uniform(*LONG_HOLD) * expire
        else:
            hold = self.rng.uniform(*HOLD)
        run_id = f"c{self.index:02d}r{n:04d}"
        err_path = os.path.join(h.dir, "err", run_id)
        launch = time.monotonic()
        env = dict(os.environ, CHAOS_RUN=run_id, CHAOS_CLIENT=f"c{self.index:02d}",
                   CHAOS_LAUNCH=repr(launch), CHAOS_PORT=str(server.port))
        argv = [self.dx, "-H", LOOPBACK, "-p", str(server.port), "-r", pool,
                "-t", f"{WAIT_TIMEOUT:g}", "-g", f"{KILL_GRACE:g}", "--id", run_id,
                "--", self.python, "-S", RECORDER, h.dir, f"{hold:.3f}"]
        with self.lock:
            if h.stop_clients.is_set():
                return
            with open(err_path, "wb") as err:
                self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
            self.run_id = run_id
            self.killed = False
        bound = WAIT_TIMEOUT + hold + 4 * expire + 30
        hung = False
        try:
            rc = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            hung = True
            self.kill()
            rc = self.proc.wait()
        end = time.monotonic()
        with self.lock:
            self.proc = None
            killed = self.killed
        try:
            with open(err_path, errors="replace") as f:
                stderr = f.read()
            os.unlink(err_path)
        except OSError:
            stderr = ""
        h.record_run({"run": run_id, "pool": pool, "server": server.name, "port": server.port,
                      "launch": launch, "end": end, "rc": rc, "hold": round(hold, 3),
                      "killed": killed, "hung": hung, "stderr": stderr[-2000:]})

    def kill(self) -> None:
        """SIGKILL the wrapper's group and its command's (the end, or a hung run)."""
        with self.lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return
            for g in children_of(proc.pid) + [proc.pid]:
                try:
                    os.killpg(g, signal.SIGCONT)
                    os.killpg(g, signal.SIGKILL)
                except OSError:
                    pass


def pool_names_by_memcached(ports: List[int]) -> List[str]:
    """Two mutex pool names whose records live on different memcacheds.

    The memcache backend places a pool's record by rendezvous hashing over
    the memcache_servers (distributex.backend.memcache); the names are
    picked so that killing either memcached loses a busy mutex.
    """
    try:
        from pymemcache.client.rendezvous import RendezvousHash
    except ImportError:
        return ["mx-a", "mx-b"]
    nodes = [f"{LOOPBACK}:{p}" for p in ports]
    ring = RendezvousHash(nodes=nodes)
    names: List[str] = []
    for node in nodes:
        for i in range(200):
            name = f"mx-{chr(ord('a') + len(names))}{i}"
            if ring.get_node(f"{NAMESPACE}:pool:{name}") == node:
                names.append(name)
                break
    return names or ["mx-a", "mx-b"]


# -- the checker ---------------------------------------------------------------------

class Section:
    __slots__ = ("run", "client", "pool", "token", "pid", "start", "end", "status", "high", "launch",
                 "port", "hold", "probes", "server", "rc", "stderr", "wrapper_killed")

    def __init__(self, start: Dict[str, Any]) -> None:
        self.run = start["run"]
        self.client = start["client"]
        self.pool = start["pool"]
        self.token = start["token"]
        self.pid = start["pid"]
        self.start = start["t"]
        self.launch = start.get("launch") or start["t"]
        self.port = start.get("port")
        self.hold = start.get("hold")
        self.end: Optional[float] = None
        self.status = "unfinished"
        self.high: Optional[int] = None
        self.probes: Dict[str, Dict[str, Any]] = {}
        self.server = "?"
        self.rc: Optional[int] = None
        self.stderr = ""
        self.wrapper_killed: Optional[float] = None

    def lease_covers(self, t: float, slack: float = DATING_SLACK) -> bool:
        """True when a /status/ probe of this section showed its lease live over ``t``:
        granted by then, and not due to end before it."""
        for p in self.probes.values():
            if p.get("result") != "held" or p.get("held_for") is None or p.get("expires_in") is None:
                continue
            if p["t"] - p["held_for"] + slack <= t <= p["t"] + p["expires_in"] - slack:
                return True
        return False

    def granted_at(self) -> Optional[float]:
        """When the server says it granted this hold (monotonic), from the start probe."""
        p = self.probes.get("start")
        if p and p.get("result") == "held" and p.get("held_for") is not None:
            return p["t"] - p["held_for"]
        return None


class Checker:
    def __init__(self, rundir: str) -> None:
        self.dir = rundir
        with open(os.path.join(rundir, "meta.json")) as f:
            self.meta = json.load(f)
        self.t0 = self.meta["t0"]
        self.expire = self.meta["expire"]
        self.events = load_jsonl(os.path.join(rundir, "events.jsonl"))
        self.runs = {r["run"]: r for r in load_jsonl(os.path.join(rundir, "runs.jsonl"))}
        self.sections: Dict[str, Section] = {}
        for path in sorted(glob.glob(os.path.join(rundir, "records", "*.jsonl"))):
            for rec in load_jsonl(path):
                if rec["ev"] == "start":
                    self.sections[rec["run"]] = Section(rec)
                    continue
                s = self.sections.get(rec["run"])
                if s is None:
                    continue
                if rec["ev"] == "probe":
                    s.probes[rec["at"]] = rec
                elif rec["ev"] == "end":
                    s.end, s.status, s.high = rec["t"], rec["status"], rec.get("high")
        port_names = {v["port"]: k for k, v in self.meta["servers"].items()}
        for s in self.sections.values():
            run = self.runs.get(s.run, {})
            s.server = run.get("server") or port_names.get(s.port, "?")
            s.rc = run.get("rc")
            s.stderr = run.get("stderr", "")
        for e in self.events:
            if e["kind"] == "kill-client" and e["target"] in self.sections:
                self.sections[e["target"]].wrapper_killed = e["t"]
        self.violations: List[str] = []
        self.figures: List[str] = []

    def rel(self, t: Optional[float]) -> str:
        return "?" if t is None else f"{t - self.t0:8.3f}"

    # -- explanations -----------------------------------------------------------

    def pauses(self, s: Section, t0: float, t1: float, minimum: float) -> List[Dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "stop-client" and e["target"] == s.run
                and e["t_end"] - e["t"] >= minimum and e["t"] < t1 and e["t_end"] > t0]

    def stale_reason(self, s: Section, until: Optional[float] = None) -> Optional[str]:
        """Why this holder may have lost its lease through no fault of the service, or None."""
        end = until if until is not None else (s.end if s.end is not None else float("inf"))
        if s.wrapper_killed is not None and s.wrapper_killed < end:
            return f"its wrapper was killed at {self.rel(s.wrapper_killed).strip()} (orphaned command)"
        paused = self.pauses(s, s.launch, end, PAUSE_EXPLAINS * self.expire)
        if paused:
            e = paused[0]
            return (f"its client was paused {e['t_end'] - e['t']:.1f} s from "
                    f"{self.rel(e['t']).strip()} (>= {PAUSE_EXPLAINS:.2f} lease)")
        # A shorter pause explains it when it spans the moment the lease ran
        # out (``until``, when the next holder was granted) and the renewals
        # before could not get through: its server or the store was down or
        # paused within that lease, so the lease ended on time and the paused
        # client could not stop its command.
        if until is not None:
            at_end = self.pauses(s, until - PAUSED_AT_END, until, 0.0)
            outages = [e for e in self.events if e["t"] < until and e["t_end"] > until - self.expire
                       and (e["kind"] in STORE_OUTAGES
                            or (e["kind"] in ("kill-dx", "stop-dx") and e["target"] == s.server))]
            if at_end and outages:
                p, o = at_end[0], outages[0]
                return (f"its client was paused from {self.rel(p['t']).strip()} to {self.rel(p['t_end']).strip()}, "
                        f"as its lease ran out, after {o['kind']} {o['target']} from {self.rel(o['t']).strip()} "
                        f"blocked its renewals")
        return None

    def late_start_reason(self, s: Section) -> Optional[str]:
        """Why this section may have started long after its grant, or None."""
        paused = self.pauses(s, s.launch, s.start, 0.0)
        if paused:
            e = paused[0]
            return f"its client was paused {e['t_end'] - e['t']:.1f} s before the command started"
        for e in self.events:
            if e["kind"] in ("stop-dx", "kill-dx") and e["target"] == s.server \
                    and e["t"] < s.start and e["t_end"] > s.launch:
                return f"its server {s.server} was {e['kind'][:4]}ed before the command started"
        return None

    def near(self, t0: float, t1: float) -> List[str]:
        lines = []
        for e in self.events:
            if e["t"] <= t1 + 0.5 and e["t_end"] >= t0 - 2 * self.expire:
                detail = {k: v for k, v in e.get("detail", {}).items() if k not in ("up",)}
                lines.append(f"      event {self.rel(e['t'])}..{self.rel(e['t_end'])} {e['kind']} "
                             f"{e['target']} {json.dumps(detail)[:300]}")
        return lines or ["      (no chaos event within two leases before)"]

    def describe(self, s: Section) -> List[str]:
        probes = []
        for at in ("start", "end"):
            p = s.probes.get(at)
            if p is None:
                continue
            what = str(p.get("result"))
            if what == "held":
                what += f" held_for={p.get('held_for')} expires_in={p.get('expires_in')}"
            elif what == "error":
                what += f" ({p.get('error')})"
            if p.get("others"):
                what += f" other holders {p['others']}"
            probes.append(f"{at}@{self.rel(p['t']).strip()}: {what}")
        lines = [f"    {s.run} token={s.token} via {s.server} launch={self.rel(s.launch)} "
                 f"start={self.rel(s.start)} end={self.rel(s.end)} -> {s.status} (high={s.high}) "
                 f"wrapper rc={s.rc}"]
        if probes:
            lines.append("      /status/ " + "; ".join(probes))
        if s.stderr.strip():
            lines.append("      wrapper stderr: " + " / ".join(s.stderr.strip().splitlines()[-3:]))
        return lines

    def server_lines(self, runs: Sequence[str], limit: int = 30) -> List[str]:
        out = []
        for name, info in sorted(self.meta["servers"].items()):
            if not name.startswith("dx"):
                continue
            try:
                with open(info["log"], errors="replace") as f:
                    stamp = ""
                    for line in f:
                        if line[:1].isdigit():
                            stamp = line.split(" ", 1)[0]
                        if any(f"host={r}" in line for r in runs):
                            out.append(f"      {name} {stamp} {line.strip()[-160:]}")
            except OSError:
                pass
        return out[:limit]

    def report_violation(self, title: str, sections: Sequence[Section], extra: Sequence[str] = ()) -> None:
        t0 = min(s.launch for s in sections)
        t1 = max((s.end or s.start) for s in sections)
        lines = [f"  VIOLATION {title}"] + list(extra)
        absent = [s.run for s in sections if s.probes.get("start", {}).get("result") in ("absent", "other-token")]
        if absent:
            lines.append(f"    the server's own /status/ of this pool did not list {', '.join(absent)} as holder "
                         "(with its token) when its command started: it ran on a grant that was not a live "
                         "hold of this pool")
        for s in sorted(sections, key=lambda x: x.start):
            lines += self.describe(s)
        lines += ["    chaos near it:"] + self.near(t0, t1)
        lines += ["    server log lines about these holders:"] + (self.server_lines([s.run for s in sections])
                                                                  or ["      (none)"])
        self.violations.append("\n".join(lines))

    # -- checks ------------------------------------------------------------------------

    def check(self) -> int:
        by_pool: Dict[str, List[Section]] = defaultdict(list)
        for s in self.sections.values():
            by_pool[s.pool].append(s)
        totals: Counter = Counter()
        explained_lines: List[str] = []
        print()
        print(f"{'pool':10} {'max':>3} {'sections':>8} {'grants':>6} {'accepted':>8} {'refused':>7} "
              f"{'terminated':>10} {'unfinished':>10} {'(a)':>4} {'(a)ok':>5} {'(b)':>4} {'(b)ok':>5} "
              f"{'(d)':>4} {'(d)ok':>5}")
        for pool in sorted(self.meta["pools"]):
            m = self.meta["pools"][pool]["maxlocks"]
            secs = sorted(by_pool.get(pool, []), key=lambda s: s.start)
            st = Counter(s.status for s in secs)
            grants = len({s.token for s in secs})
            a_bad, a_ok, d_bad, d_ok = self.check_overlaps(pool, m, secs, explained_lines)
            b_bad, b_ok = self.check_tokens(pool, m, secs, explained_lines)
            row = dict(sections=len(secs), grants=grants, accepted=st["accepted"], refused=st["refused"],
                       terminated=st["terminated"], unfinished=st["unfinished"], a=a_bad, a_ok=a_ok,
                       b=b_bad, b_ok=b_ok, d=d_bad, d_ok=d_ok)
            totals.update(row)
            print(f"{pool:10} {m:>3} {len(secs):>8} {grants:>6} {st['accepted']:>8} {st['refused']:>7} "
                  f"{st['terminated']:>10} {st['unfinished']:>10} {a_bad:>4} {a_ok:>5} {b_bad:>4} {b_ok:>5} "
                  f"{d_bad:>4} {d_ok:>5}")
        e_bad = self.check_lock_delay(by_pool)
        self.check_fence_files()
        print(f"{'total':10} {'':>3} {totals['sections']:>8} {totals['grants']:>6} {totals['accepted']:>8} "
              f"{totals['refused']:>7} {totals['terminated']:>10} {totals['unfinished']:>10} "
              f"{totals['a']:>4} {totals['a_ok']:>5} {totals['b']:>4} {totals['b_ok']:>5} "
              f"{totals['d']:>4} {totals['d_ok']:>5}")
        print("  (a) accepted overlaps beyond maxlocks, (b) token regressions, (d) overlaps the fence or the "
              "client contained; 'ok' = explained by a client pause >= 2/3 lease or a killed wrapper")
        self.print_runs()
        self.print_events()
        self.print_servers()
        if explained_lines:
            print(f"\nexplained cases ({len(explained_lines)}; first 25):")
            for line in explained_lines[:25]:
                print(line)
        print()
        print(f"(a) accepted overlaps, unexplained: {totals['a']}   (explained: {totals['a_ok']})")
        print(f"(b) token regressions:              {totals['b']}   (late starts explained: {totals['b_ok']})")
        print(f"(c) fenced refusals:                {totals['refused']}")
        print(f"(d) contained overlaps, unexplained: {totals['d']}   (explained: {totals['d_ok']})")
        print(f"(e) grants during a lock-delay:     {e_bad}")
        if self.violations:
            print(f"\n{len(self.violations)} VIOLATION(S):")
            for v in self.violations[:40]:
                print(v)
                print()
        failed = totals["a"] or totals["b"] or totals["d"] or e_bad
        print("RESULT:", "FAIL" if failed else "PASS", f"({len(self.sections)} sections checked)")
        return 1 if failed else 0

    def check_overlaps(self, pool: str, m: int, secs: List[Section],
                       explained_lines: List[str]) -> Tuple[int, int, int, int]:
        """(a) over the accepted sections, (d) over the others: sets of more than m at once."""
        ended = [s for s in secs if s.end is not None]
        accepted = [s for s in ended if s.status == "accepted"]
        a_sets = crowds(accepted, m)
        all_sets = [c for c in crowds(ended, m) if c not in set(a_sets)]
        # A set that only adds unfinished (killed) sections has no interval to
        # compare; sections without an end are left out of the sweep.
        counts = [0, 0, 0, 0]
        for kind, sets in (("a", a_sets), ("d", all_sets)):
            for crowd in sets:
                ranked = sorted(crowd, key=lambda s: -s.token)
                # The extra sections are explained when that many of the older
                # ones (all but the newest grant) had lost their leases (pause,
                # orphan). In a mutex those are the lowest tokens; in a
                # semaphore an older holder may renew all along while a younger
                # one lapses, so any of the older ones may be the stale one.
                until = max(x.start for x in crowd)
                older = [(s, self.stale_reason(s, until=max(until, s.start))) for s in ranked[1:]]
                stale = [(s, r) for s, r in older if r]
                low = [s for s, _ in stale] if len(stale) >= len(crowd) - m else ranked[m:]
                reasons = [r for _, r in stale] if len(stale) >= len(crowd) - m else [None]
                # The servers' own word overrides any excuse: if /status/ showed
                # more than m leases of this pool live at one moment, no pause or
                # orphan explains it (a lease ends early only by a release, and a
                # section still running has not been released).
                moment = max(x.start for x in crowd)
                live = [x for x in crowd if x.lease_covers(moment)]
                if len(live) > m:
                    reasons = [None]
                if all(reasons):
                    counts[1 if kind == "a" else 3] += 1
                    explained_lines.append(
                        f"  ({kind}) {pool}: " + ", ".join(f"{s.run} t={s.token} {s.status}" for s in ranked)
                        + " overlap; older: " + "; ".join(f"{s.run} {r}" for s, r in zip(low, reasons)))
                else:
                    counts[0 if kind == "a" else 2] += 1
                    title = (f"({kind}) pool {pool} (maxlocks {m}): {len(crowd)} sections at once"
                             + ("" if kind == "a" else ", the extra ones contained ("
                                + ", ".join(s.status for s in low) + ")"))
                    extra = [f"    overlap {self.rel(max(s.start for s in crowd))} .. "
                             f"{self.rel(min(s.end or 0.0 for s in crowd))}"]
                    if len(live) > m:
                        extra.append(f"    at {self.rel(moment).strip()} the servers' /status/ showed "
                                     f"{len(live)} live leases: " + ", ".join(x.run for x in live))
                    else:
                        extra += [f"    not explained: {x.run} (token {x.token}) had no client pause of "
                                  f">= {PAUSE_EXPLAINS:.2f} lease and its wrapper was not killed" for x, r in
                                  zip(low, [self.stale_reason(x, until=max(moment, x.start)) for x in low])
                                  if not r]
                    self.report_violation(title, ranked, extra)
        return counts[0], counts[1], counts[2], counts[3]

    def check_tokens(self, pool: str, m: int, secs: List[Section],
                     explained_lines: List[str]) -> Tuple[int, int]:
        """(b): a section that started after another ended with a token not above it."""
        bad = ok = 0
        done = sorted((s for s in secs if s.end is not None), key=lambda s: s.end or 0.0)
        ends = [s.end or 0.0 for s in done]
        best: List[Section] = []  # best[i]: the highest-token section among done[:i+1]
        for s in done:
            best.append(s if not best or s.token >= best[-1].token else best[-1])
        for b in secs:
            i = bisect.bisect_left(ends, b.start) - 1
            if i < 0 or best[i].token < b.token:
                continue
            a = best[i]
            if a is b:
                continue
            why_bad = None
            if a.token == b.token:
                why_bad = "two sections carry one token"
            elif b.launch > a.start:
                why_bad = (f"{b.run}'s wrapper started after {a.run}'s command began: "
                           "its grant came later, yet its token is lower")
            elif m == 1:
                late = self.late_start_reason(b)
                if late is None:
                    why_bad = (f"{b.run} started after {a.run} ended with a lower token and nothing "
                               "delayed it between its grant and its start")
            else:
                ga, gb = a.granted_at(), b.granted_at()
                if ga is not None and gb is not None and gb > ga + DATING_SLACK:
                    why_bad = (f"/status/ dates {b.run}'s grant {gb - ga:.3f} s after {a.run}'s, "
                               "yet its token is lower")
            if why_bad:
                bad += 1
                self.report_violation(f"(b) pool {pool}: token {b.token} after {a.token}",
                                      [a, b], [f"    {why_bad}"])
            else:
                ok += 1
                ga, gb = a.granted_at(), b.granted_at()
                dating = "" if ga is None or gb is None else f", /status/ dates it {ga - gb:.3f} s before"
                explained_lines.append(
                    f"  (b) {pool}: {b.run} t={b.token} started {b.start - a.end:.3f} s after {a.run} "
                    f"t={a.token} ended ({b.status}); granted first: "
                    f"{self.late_start_reason(b) or 'semaphore, two holders at once'}{dating}")
        return bad, ok

    def check_lock_delay(self, by_pool: Dict[str, List[Section]]) -> int:
        """(e): no grant within a lease of a memcached restart in a pool it lost with live holders.

        A section's grant came after the restart when its wrapper started
        after it, or when /status/ (probed at the section's start) dates it
        after; it came within the lease when the section started within it.
        """
        bad = held = 0
        lines = []
        for e in self.events:
            if e["kind"] not in ("kill-memcached", "power-cut"):
                continue
            up = e["detail"].get("up", e["t_end"])
            lost = e["detail"].get("lost", {}).get("pools", {})
            for pool, rec in sorted(lost.items()):
                holders = rec.get("holders", [])
                after = [s for s in by_pool.get(pool, []) if self.granted_after(s, up)]
                first = min(after, key=lambda s: s.start, default=None)
                gap = None if first is None else first.start - up
                lines.append(f"  {self.rel(e['t'])} {e['target']}: pool {pool} lost with "
                             f"{len(holders)} live holder(s); first grant after the restart started "
                             f"{'(none)' if gap is None else f'{gap:.2f} s'} after it"
                             + ("" if first is None else f" ({first.run} via {first.server})"))
                if not holders:
                    continue
                # A section that /status/ says is no holder of this pool was not
                # granted in it (it shows under (a), (b) or (d) instead).
                early = sorted((s for s in after if s.start < up + self.expire
                                and s.probes.get("start", {}).get("result") not in ("absent", "other-token")),
                               key=lambda s: s.start)
                if not early:
                    held += 1
                    continue
                bad += len(early)
                lost_runs = {h.get("host") for h in holders}
                dating = [f"    {s.run} granted after the restart: "
                          + (f"its wrapper started at {self.rel(s.launch).strip()}" if s.launch > up else
                             f"/status/ dates its grant at {self.rel(s.granted_at()).strip()}")
                          for s in early]
                self.report_violation(
                    f"(e) pool {pool}: {len(early)} grant(s) within a lease of {e['target']}'s restart, "
                    f"the first {early[0].start - up:.2f} s after it (lock-delay is {self.expire:g} s)",
                    early + [x for x in self.sections.values() if x.run in lost_runs and x not in early],
                    [f"    {e['target']} was killed at {self.rel(e['t']).strip()} and listened again at "
                     f"{self.rel(up).strip()}; it held the epoch key: {e['detail']['lost'].get('epoch')}",
                     f"    holders lost with the record: {holders}"] + dating)
        if lines:
            print("\nmemcached restarts (lock-delay):")
            for line in lines:
                print(line)
            print(f"  lock-delay kept after {held} restart(s) that lost live holders, broken after "
                  f"{bad} grant(s)")
        return bad

    def granted_after(self, s: Section, t: float) -> bool:
        g = s.granted_at()
        return s.launch > t or (g is not None and g - DATING_SLACK > t)

    def check_fence_files(self) -> None:
        """The resources' own counts must match the records."""
        for pool in self.meta["pools"]:
            try:
                with open(os.path.join(self.dir, "resource", pool)) as f:
                    _, accepted, refused = (int(x) for x in f.read().split())
            except (OSError, ValueError):
                continue
            secs = [s for s in self.sections.values() if s.pool == pool]
            got = (sum(s.status == "accepted" for s in secs), sum(s.status == "refused" for s in secs))
            if got != (accepted, refused):
                print(f"  note: resource {pool} counted {accepted} accepted / {refused} refused, "
                      f"records say {got[0]} / {got[1]} (a write whose record was lost to a kill)")

    def print_runs(self) -> None:
        rcs: Counter = Counter()
        messages: Counter = Counter()
        tracebacks = []
        for r in self.runs.values():
            rc = r["rc"]
            if r.get("error"):
                rcs["could not start: " + r["error"][:80]] += 1
                continue
            key = ("ok" if rc == 0 else "killed by chaos" if r.get("killed")
                   else "hung (killed)" if r.get("hung") else f"exit {rc}")
            rcs[key] += 1
            for line in r.get("stderr", "").splitlines():
                if "Traceback" in line:
                    tracebacks.append(r["run"])
                if line.startswith("distributex:"):
                    messages[normalise(line)] += 1
        gave_up = [r["run"] for r in self.runs.values()
                   if r["rc"] == 1 and r["run"] not in self.sections and "(HTTP 503)" in r.get("stderr", "")
                   and r["end"] - r["launch"] < WAIT_TIMEOUT - 1]
        with_section = sum(1 for r in self.runs if r in self.sections)
        print(f"\nwrapper runs: {len(self.runs)} ({with_section} ran their command): "
              + ", ".join(f"{k} {v}" for k, v in rcs.most_common()))
        for msg, n in messages.most_common(12):
            print(f"  {n:6} x {msg}")
        if gave_up:
            print(f"  FINDING: {len(gave_up)} wrapper run(s) gave up at once on ERROR (503) before the "
                  f"grant instead of retrying within -t (contract section 7), e.g. {gave_up[:3]}")
        if tracebacks:
            print(f"  FINDING: {len(tracebacks)} wrapper run(s) printed a traceback "
                  f"(the contract says no input ever does): {tracebacks[:5]}")

    def print_events(self) -> None:
        kinds = Counter(e["kind"] for e in self.events)
        holding = sum(1 for e in self.events if e["kind"] == "kill-client" and e["detail"]["commands_left_running"])
        paused_holding = sum(1 for e in self.events if e["kind"] == "stop-client" and e["detail"].get("holding"))
        print("\nchaos events: " + ", ".join(f"{k} {kinds[k]}" for k in WEIGHTS)
              + f"  (wrappers killed while their command ran: {holding}; clients paused while "
              f"their command ran: {paused_holding})")
        targets = Counter(e["target"] for e in self.events if e["kind"] in ("kill-dx", "stop-dx"))
        print("  per server: " + ", ".join(f"{k} {v}" for k, v in sorted(targets.items())))

    def print_servers(self) -> None:
        for name, info in sorted(self.meta["servers"].items()):
            try:
                with open(info["log"], errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            starts = text.count("=== chaos: start")
            notes = []
            for word in ("Traceback", "Unhandled", "CRITICAL", "critical", "lock-delay",
                         "grants nothing", "Another twistd"):
                n = text.count(word)
                if n:
                    notes.append(f"{word!r} x{n}")
            print(f"  {name:10} started {starts} time(s)" + (("; log: " + ", ".join(notes)) if notes else ""))
            if "Traceback" in text:
                idx = text.index("Traceback")
                snippet = text[max(0, idx - 300): idx + 1200].strip().splitlines()
                print("    first traceback:\n      " + "\n      ".join(snippet[-25:]))


def crowds(secs: List[Section], m: int) -> List[frozenset]:
    """The distinct sets of more than ``m`` sections running at one moment."""
    points = []
    for s in secs:
        points.append((s.start, 1, id(s), s))
        points.append((s.end, 0, id(s), s))
    points.sort(key=lambda p: (p[0], p[1]))  # at one instant an end comes before a start
    active: set = set()
    out: List[frozenset] = []
    seen: set = set()
    for _, is_start, _, s in points:
        if is_start:
            active.add(s)
            if len(active) > m:
                crowd = frozenset(active)
                if crowd not in seen:
                    seen.add(crowd)
                    out.append(crowd)
        else:
            active.discard(s)
    return out


def normalise(line: str) -> str:
    import re
    line = re.sub(r"token \d+", "token N", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:150]


def load_jsonl(path: str) -> List[Dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # a line cut by a kill
    except OSError:
        pass
    return out


# -- main ------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (default 600)")
    p.add_argument("--short", action="store_true", help="a quick check: --duration 60")
    p.add_argument("--clients", type=int, default=30, help="wrapped clients (default 30)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--expire", type=float, default=3.0, help="lease of every pool, seconds (default 3)")
    p.add_argument("--no-inmemory", action="store_true",
                   help="leave out the in-memory server (it needs the state_file key)")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, records)")
    p.add_argument("--check", metavar="DIR", help="only run the checker on a kept run's directory")
    args = p.parse_args(argv)
    if args.short:
        args.duration = 60.0
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    if not (1 <= args.clients <= 200):
        p.error("--clients: 1 to 200")
    if not (0 < args.duration <= 24 * 3600):
        p.error("--duration: up to a day")
    if not (0.5 <= args.expire <= 60):
        p.error("--expire: 0.5 to 60 seconds")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.check:
        return Checker(args.check).check()
    if not os.path.exists(MEMCACHED):
        print("memcached is not installed (apt-get install -y memcached)", file=sys.stderr)
        return 2
    print_header("chaos: kill -9 and SIGSTOP servers, memcacheds and clients; check the grants", [
        f"run:     {args.duration:g} s, {args.clients} clients, lease {args.expire:g} s, seed {args.seed}"
        + (", no in-memory server" if args.no_inmemory else ""),
        f"code under test: {os.environ['PYTHONPATH']} (PYTHONPATH)" if os.environ.get("PYTHONPATH")
        else f"code under test: the installed distributex ({python_script('distributex')})"])
    h = Harness(args)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    status = 2
    try:
        try:
            h.run()
        except KeyboardInterrupt:
            h.interrupted = True
            print("\ninterrupted: stopping everything", file=sys.stderr)
        finally:
            try:
                h.wind_down()
            finally:
                h.kill_clients()
                h.stop_servers()
        elapsed = time.monotonic() - h.t0
        print(f"\nservers: {', '.join(f'{s.name}:{s.port}' for s in h.everything())}; "
              f"pools: " + ", ".join(f"{n} (max {p['maxlocks']}, {p['backend']})" for n, p in h.pools.items()))
        print(f"ran {elapsed:.0f} s; subreaper: {'yes' if h.subreaper else 'no (orphans are killed by pid)'}")
        nonzero = {k: v for k, v in h.exit_statuses.items() if v not in (0, None)}
        if nonzero:
            print(f"FINDING: servers that did not exit 0 on SIGTERM: {nonzero}")
        for s in h.everything():
            for note in s.notes:
                print(f"note: {s.name}: {note}")
        for err in h.chaos_errors[:20]:
            print(f"chaos step failed: {err}")
        status = Checker(h.dir).check()
    except SystemExit as e:
        print(e, file=sys.stderr)
        status = 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep or status == 1:
            print(f"run directory kept: {h.dir}")
        else:
            shutil.rmtree(h.dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
