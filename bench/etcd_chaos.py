"""Chaos run on etcd: bench/chaos.py's clients, checker and server chaos,
with three distributex servers on a 3-member etcd cluster whose members are
killed (the leader among them) and paused at random.

    python bench/etcd_chaos.py [--duration 600] [--clients 30] [--seed N] [--expire 3] [--keep]
    python bench/etcd_chaos.py --short            # 60 s

The topology, all on 127.0.0.1 and free ports: three etcd members (data on
tmpfs, etcd's default timing: heartbeat 100 ms, election 1 s) and three
``twistd -n distributex`` with ``backend: etcd`` and every member in
``etcd_endpoints``. Pools: two mutexes and one semaphore (maxlocks 2),
lease ``--expire``. (Inside chaos.py's harness the pools are labelled
"memcache", its name for "the pools of the shared-backend servers": that is
what routes the clients to the three etcd-backed servers.)

The chaos, one event every 2.5 s on average, at most three at a time, at
most one etcd member down or paused at a time (a quorum stays):

- ``kill-dx``, ``stop-dx``, ``kill-client``, ``stop-client``: as in chaos.py;
- ``kill-etcd``: kill -9 a random member, start it again after 0.2 to 3 s;
- ``kill-etcd-leader``: the same, to the member that leads;
- ``stop-etcd``: SIGSTOP a member for 1 to 4 s (a member that stops
  answering without closing its connections; when it is the leader, the
  others elect another).

The checker is chaos.py's: overlaps beyond maxlocks, token regressions,
fenced refusals. Exit status 0: no violation; 1: a violation; 2: the run
could not be made.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chaos  # noqa: E402
from chaos import Checker, Harness, Managed, free_port, print_header, python_script  # noqa: E402

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCD_DOWN = (0.2, 3.0)
ETCD_STOP = (1.0, 4.0)
WEIGHTS = {"kill-dx": 3, "stop-dx": 3, "kill-client": 3, "stop-client": 3,
           "kill-etcd": 2, "kill-etcd-leader": 2, "stop-etcd": 2}


def member_status(port: int) -> Optional[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}",
                                     method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


class EtcdHarness(Harness):
    def __init__(self, args: Any) -> None:
        super().__init__(args)
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.etcd_dir = tempfile.mkdtemp(prefix="dx-chaos-etcd-", dir=base)
        self.etcds: List[Managed] = []
        self.etcd_down = threading.Lock()  # one member down or paused at a time: a quorum stays

    def start_servers(self) -> None:
        expire = self.args.expire
        ports = [(free_port(), free_port()) for _ in range(3)]
        initial = ",".join(f"e{i + 1}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        for i, (client, peer) in enumerate(ports):
            name = f"e{i + 1}"
            workdir = os.path.join(self.dir, "servers", name)
            os.makedirs(workdir)
            cmd = [ETCD, "--name", name, "--data-dir", os.path.join(self.etcd_dir, name),
                   "--listen-client-urls", f"http://127.0.0.1:{client}",
                   "--advertise-client-urls", f"http://127.0.0.1:{client}",
                   "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-cluster", initial, "--initial-cluster-token", os.path.basename(self.etcd_dir),
                   "--log-level", "warn"]
            m = Managed(name, "etcd", client, cmd, workdir, self.closing)
            m.start()
            self.etcds.append(m)
        self.memcacheds = self.etcds  # what chaos.py starts again and stops at the end
        for name in ("m1", "m2"):
            self.pools[name] = {"maxlocks": 1, "expire": expire, "backend": "memcache"}
        self.pools["msem"] = {"maxlocks": 2, "expire": expire, "backend": "memcache"}
        twistd = python_script("twistd")
        endpoints = [f"http://127.0.0.1:{m.port}" for m in self.etcds]
        for i in range(3):
            config = {"backend": "etcd", "etcd_endpoints": endpoints, "namespace": "chaos",
                      "pools": self._pool_config("memcache")}
            self.dx_memcache.append(self._dx(f"dx{i + 1}", "dx-etcd", config, twistd))

    def leader(self) -> Optional[Managed]:
        for m in self.etcds:
            if not m.alive or m.stopped:
                continue
            status = member_status(m.port)
            if status is not None and status.get("leader") == status["header"]["member_id"]:
                return m
        return None

    def _etcd_event(self, kind: str, target: Optional[Managed], rng: random.Random, pause: bool) -> None:
        if not self.etcd_down.acquire(blocking=False):
            return
        try:
            if target is None or not target.busy.acquire(blocking=False):
                return
            try:
                t = self.now()
                if pause:
                    length = rng.uniform(*ETCD_STOP)
                    target.pause()
                    self._sleep(length)
                    target.resume()
                    detail = {"stopped": round(length, 3)}
                else:
                    down = rng.uniform(*ETCD_DOWN)
                    target.kill9()
                    self._sleep(down)
                    target.start()
                    detail = {"down": round(down, 3)}
                self.record_event({"kind": kind, "target": target.name, "t": t, "t_end": self.now(),
                                   "detail": detail})
            finally:
                target.busy.release()
        finally:
            self.etcd_down.release()

    def _kill_etcd(self, rng: random.Random) -> None:
        self._etcd_event("kill-etcd", rng.choice(self.etcds), rng, pause=False)

    def _kill_etcd_leader(self, rng: random.Random) -> None:
        self._etcd_event("kill-etcd-leader", self.leader(), rng, pause=False)

    def _stop_etcd(self, rng: random.Random) -> None:
        self._etcd_event("stop-etcd", rng.choice(self.etcds), rng, pause=True)

    def memcached_snapshot(self, mc: Managed) -> dict:
        return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = chaos.parse_args(argv)
    if args.check:
        return Checker(args.check).check()
    if not os.path.exists(ETCD):
        print("etcd is not installed (apt-get install -y etcd-server)", file=sys.stderr)
        return 2
    chaos.WEIGHTS.clear()
    chaos.WEIGHTS.update(WEIGHTS)
    print_header("chaos on etcd: kill -9 and SIGSTOP distributex servers, etcd members (the leader too) "
                 "and clients; check the grants", [
                     f"run:     {args.duration:g} s, {args.clients} clients, lease {args.expire:g} s, "
                     f"seed {args.seed}"])
    h = EtcdHarness(args)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, chaos._interrupt)
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
        counts: dict = {}
        for e in h.events:
            counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        print(f"\nservers: {', '.join(f'{s.name}:{s.port}' for s in h.everything())}; pools: "
              + ", ".join(f"{n} (max {p['maxlocks']}, etcd)" for n, p in h.pools.items()))
        print(f"ran {elapsed:.0f} s; chaos events: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        nonzero = {k: v for k, v in h.exit_statuses.items() if v not in (0, None)}
        if nonzero:
            print(f"FINDING: servers that did not exit 0 on SIGTERM: {nonzero}")
        for err in h.chaos_errors[:20]:
            print(f"chaos step failed: {err}")
        status = Checker(h.dir).check()
    except SystemExit as e:
        print(e, file=sys.stderr)
        status = 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(h.etcd_dir, ignore_errors=True)
        if args.keep or status == 1:
            print(f"run directory kept: {h.dir}")
        else:
            shutil.rmtree(h.dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
