"""A real etcd cluster for the tests: members on 127.0.0.1, free ports, data
on tmpfs (/dev/shm when there is one: fsync is then cheap, which keeps the
suite fast; the Raft protocol, elections and leases are the real ones).

A test may kill -9 a member (``kill``), SIGSTOP it, start it again
(``start``) and ask which one leads (``leader``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import List, Optional

from servers import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def available() -> bool:
    return os.path.exists(ETCD)


def _json_post(url: str, payload: dict, timeout: float = 2.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


class Member:
    def __init__(self, name: str, data_dir: str) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.member_id: Optional[str] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` etcd members forming one cluster on loopback."""

    def __init__(self, size: int = 3, heartbeat_ms: int = 50, election_ms: int = 500,
                 extra_args: tuple = ()) -> None:
        if not available():
            raise RuntimeError("etcd is not installed: apt-get install -y etcd-server")
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="dx-etcd-", dir=base)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.extra_args = extra_args
        self.token = f"dx-{os.getpid()}-{time.monotonic_ns()}"
        self.members = [Member(f"m{i}", os.path.join(self.dir, f"m{i}")) for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            self._spawn(member, "new")
        self.wait_healthy()

    @property
    def endpoints(self) -> List[str]:
        return [m.url for m in self.members]

    def _spawn(self, member: Member, state: str) -> None:
        log = open(os.path.join(self.dir, f"{member.name}.log"), "ab")
        member.proc = subprocess.Popen(
            [ETCD, "--name", member.name, "--data-dir", member.data_dir,
             "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
             "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
             "--initial-cluster", self.initial, "--initial-cluster-state", state,
             "--initial-cluster-token", self.token,
             "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
             "--log-level", "warn", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def status(self, member: Member) -> Optional[dict]:
        try:
            return _json_post(f"{member.url}/v3/maintenance/status", {}, timeout=1.0)
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running member answers and the cluster has a leader that
        serves a linearizable read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            for member in self.members:
                if not member.running:
                    continue
                status = self.status(member)
                if status is None or status.get("leader", "0") == "0":
                    ok = False
                    break
                member.member_id = status["header"]["member_id"]
            if ok:
                try:
                    _json_post(f"{self.running()[0].url}/v3/kv/range", {"key": "AA=="}, timeout=2.0)
                    return
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd cluster not healthy after {timeout}s; logs in {self.dir}")

    def running(self) -> List[Member]:
        return [m for m in self.members if m.running]

    def leader(self) -> Member:
        for member in self.running():
            status = self.status(member)
            if status is not None and status.get("leader") == status["header"]["member_id"]:
                return member
        raise RuntimeError("no leader")

    def followers(self) -> List[Member]:
        lead = self.leader()
        return [m for m in self.running() if m is not lead]

    def kill(self, member: Member) -> None:
        """kill -9: no goodbye to its peers."""
        if member.running:
            assert member.proc is not None
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait()

    def start(self, member: Member) -> None:
        """Start a killed member again on its own data."""
        if not member.running:
            self._spawn(member, "existing")

    def stop(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGCONT)
                member.proc.kill()
                member.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
