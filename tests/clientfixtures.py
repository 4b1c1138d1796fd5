"""Helpers of the client tests: the real server, the real command, checks.

Every test talks to a real `twistd -n distributex` on 127.0.0.1 (from
servers.py) and runs the real command from the checkout (client/distributex).
A test module imports the fixtures it uses, dx_server (fixture ``dx``) and
private_lock_dir (fixture ``lock_dir``).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import pytest
from servers import ROOT, DistributexServer, wait_until  # noqa: F401  (wait_until: re-exported for the client tests)

CLIENT = os.path.join(ROOT, "client", "distributex")

# Leases: long where a test must not see one run out, short where a test
# waits for a loss (the renewals come every third of it).
LONG = 300
SHORT = 1.5

POOLS: List[Dict[str, Any]] = (
    [{"name": name, "expire": LONG} for name in (
        "exits", "env", "burst", "order", "skip", "timeout", "signals", "waiting",
        "local", "api", "api-busy", "tx", "tx-busy")]
    + [{"name": name, "expire": SHORT} for name in (
        "lost", "grace", "stopped", "api-lost", "api-renew", "tx-lost", "tx-run")]
    + [{"name": "forever", "expire": 0}]
)


def start_dx(workdir: str, pools: Optional[List[Dict[str, Any]]] = None,
             **settings: Any) -> DistributexServer:
    """A real server with the pools of the client tests (or ``pools``)."""
    return DistributexServer(dict(settings, pools=pools or POOLS), workdir=workdir)


@pytest.fixture(scope="module", name="dx")
def dx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributexServer]:
    """One real server for a module's tests; each test uses its own pools."""
    server = start_dx(str(tmp_path_factory.mktemp("dx")))
    yield server
    server.kill()


@pytest.fixture(name="lock_dir")
def private_lock_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private directory for the local lock files of one test."""
    path = str(tmp_path / "locks")
    monkeypatch.setenv("DISTRIBUTEX_LOCK_DIR", path)
    return path


def client_args(server: Optional[DistributexServer], *args: str) -> List[str]:
    where = ["-H", "127.0.0.1", "-p", str(server.port)] if server is not None else []
    return [sys.executable, CLIENT, *where, *args]


def run_client(server: Optional[DistributexServer], *args: str,
               timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the command to its end; stdout and stderr as text."""
    return subprocess.run(client_args(server, *args), capture_output=True, text=True,
                          timeout=timeout)


def start_client(server: Optional[DistributexServer], *args: str,
                 **popen: Any) -> subprocess.Popen:
    """Start the command in the background, stderr kept for the test."""
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(client_args(server, *args), text=True, **popen)


def wait_all(clients: List[subprocess.Popen], timeout: float = 30) -> List[int]:
    """The exit statuses of all the clients; none is left running."""
    try:
        return [client.wait(timeout) for client in clients]
    finally:
        for client in clients:
            stop(client)


def read(path: Any) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def hosts(server: DistributexServer, pool: str, which: str = "holders") -> List[str]:
    return [entry["host"] for entry in server.status(pool)[which]]


def hold(server: DistributexServer, pool: str, host: str) -> None:
    answer = server.call("get", pool=pool, host=host)
    assert answer.text == "YES", answer


def release(server: DistributexServer, pool: str, host: str) -> None:
    assert server.call("release", pool=pool, host=host).text == "OK"


@contextmanager
def held_by(server: DistributexServer, pool: str, host: str = "other") -> Iterator[None]:
    """The pool held by somebody else for the time of the block."""
    hold(server, pool, host)
    try:
        yield
    finally:
        release(server, pool, host)


def steal(server: DistributexServer, pool: str, victim: str, thief: str = "thief") -> None:
    """End the victim's hold behind its back and let a thief take the pool:
    the victim's next renewal is answered NO."""
    release(server, pool, victim)
    hold(server, pool, thief)


def assert_pool_free(server: DistributexServer, pool: str) -> None:
    status = server.status(pool)
    assert status["holders"] == [] and status["waiters"] == [], status


def assert_unlocked(lock_dir: str, pool: str) -> None:
    """The pool's local lock file is there and nobody holds its flock."""
    with open(os.path.join(lock_dir, f"{pool}.lock")) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if held


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(process: subprocess.Popen) -> None:
    """Cleanup for a test that failed half-way: no stray client left.

    SIGTERM first, which the client passes to its command's process group
    (a SIGKILL would leave the command running in its own session).
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
