"""Helpers of the client tests: the real server, the real command, checks.

Every test talks to a real `twistd -n distributex` on 127.0.0.1 (from
servers.py), directly or through a Relay (a real proxy that can go bad), and
runs the real command from the checkout (client/distributex). A test module
imports the fixtures it uses, dx_server (fixture ``dx``) and
private_lock_dir (fixture ``lock_dir``).

Twisted code runs on the global reactor in the test's own thread, only while
a test waits for it (wait_for, spin_until), as trial does it: run() until
the awaited Deferred fires, then crash(), which lets run() be called again.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
from servers import ROOT, DistributexServer, wait_until  # noqa: F401  (wait_until: re-exported for the client tests)
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

CLIENT = os.path.join(ROOT, "client", "distributex")

# Leases: long where a test must not see one run out, short where a test
# waits for a loss (the renewals come every third of it).
LONG = 300
SHORT = 1.5

POOLS: List[Dict[str, Any]] = (
    [{"name": name, "expire": LONG} for name in (
        "exits", "env", "burst", "order", "skip", "timeout", "signals", "waiting",
        "local", "sessions", "interrupted", "api", "api-busy")]
    + [{"name": name, "expire": SHORT} for name in (
        "lost", "grace", "stopped", "api-lost")]
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


def release(server: DistributexServer, pool: str, host: str,
            session: Optional[str] = None) -> None:
    assert server.call("release", pool=pool, host=host, session=session).text == "OK"


def sessions(server: DistributexServer, pool: str, host: str) -> List[Optional[str]]:
    """The sessions in which ``host`` holds ``pool`` (None: held without one)."""
    return [entry.get("session") for entry in server.status(pool)["holders"]
            if entry["host"] == host]


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
    for session in sessions(server, pool, victim):
        release(server, pool, victim, session)
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


# -- a real proxy in front of the real server -----------------------------------

class Relay:
    """A real HTTP peer between a client and the real server, as a proxy is.

    It passes each request on to the server and the answer back, and records
    the request targets. On the test's word it answers the requests itself
    with given bytes (a proxy's page, garbage: ``answer``), or holds them
    until let go (``hold``/``let_go``: a request in flight for as long as
    the test wants).
    """

    def __init__(self, server: DistributexServer) -> None:
        self.upstream = ("127.0.0.1", server.port)
        self.answer: Optional[bytes] = None
        self._targets: List[str] = []
        self._mutex = threading.Lock()
        self._passing = threading.Event()
        self._passing.set()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> List[tuple]:
        """(path, params) of every request so far, in order of arrival."""
        with self._mutex:
            targets = list(self._targets)
        parsed = [urlsplit(target) for target in targets]
        return [(p.path, {k: v[-1] for k, v in parse_qs(p.query).items()}) for p in parsed]

    def paths(self) -> List[str]:
        return [path for path, _ in self.requests()]

    def hold(self) -> None:
        """Keep the requests that arrive from now on until :meth:`let_go`."""
        self._passing.clear()

    def let_go(self) -> None:
        self._passing.set()

    def close(self) -> None:
        self.let_go()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() would not
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        return
                    head += data
                with self._mutex:
                    self._targets.append(head.split(b" ", 2)[1].decode("latin-1"))
                answer = self.answer
                if answer is not None:
                    conn.sendall(answer)
                    return
                self._passing.wait()
                with socket.create_connection(self.upstream) as upstream:
                    upstream.sendall(head)  # a GET: the head is all of it
                    while True:
                        data = upstream.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)
            except OSError:
                return  # the client gave up: nothing to pass on


@pytest.fixture(name="relay")
def relay_fixture(dx: DistributexServer) -> Iterator[Relay]:
    """A Relay in front of the module's server ``dx``."""
    relay = Relay(dx)
    yield relay
    relay.close()


# -- Twisted code, run from a pytest test ---------------------------------------------

def wait_for(deferred: "Deferred[Any]", timeout: float = 30) -> Any:
    """Run the reactor until ``deferred`` fires; its result, or raise its failure."""
    from twisted.internet import reactor

    results: List[Any] = []
    deferred.addBoth(results.append)
    if not results:
        deferred.addBoth(lambda _: reactor.crash())
        # The reactor is never stopped, so neither is its thread pool (name
        # lookups): daemon threads, or pytest's exit would wait for them.
        reactor.getThreadPool().threadFactory = _daemon_thread
        timer = reactor.callLater(timeout, reactor.crash)
        reactor.run(installSignalHandlers=False)
        if timer.active():
            timer.cancel()
    if not results:
        raise AssertionError(f"no result after {timeout} s from {deferred!r}")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def pause(seconds: float) -> None:
    """Run the reactor for ``seconds``."""
    from twisted.internet import reactor, task

    wait_for(task.deferLater(reactor, seconds, lambda: None))


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


def spin_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """wait_until, with the reactor running while it waits."""
    from twisted.internet import reactor, task

    def check() -> Any:
        value = predicate()
        if not value:
            wait_for(task.deferLater(reactor, 0.01, lambda: None))
        return value

    return wait_until(check, timeout, what, interval=0)
