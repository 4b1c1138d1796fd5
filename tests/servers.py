"""Real processes for the tests: memcached and distributex servers (twistd).

Every process listens on 127.0.0.1 only, on a free port, and is stopped when
its test ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml
from pymemcache.client.base import Client as MemcacheClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"


#: How many ports a process that a test starts may try: a port free_port()
#: found may be taken by another test's process (the other pytest-xdist
#: worker's) before ours binds it.
PORT_ATTEMPTS = 5


class PortTaken(RuntimeError):
    """The process could not listen: another process had taken its port."""


def on_a_free_port(start: Callable[[], None], attempts: int = PORT_ATTEMPTS) -> None:
    """Call ``start`` (which picks a port and starts on it) until it does
    not raise PortTaken, ``attempts`` times at most."""
    for attempt in range(attempts):
        try:
            start()
            return
        except PortTaken:
            if attempt == attempts - 1:
                raise


def free_port() -> int:
    """A port free now; it may be taken before it is used (see PortTaken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "",
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def twistd_command() -> List[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [twistd if os.path.exists(twistd) else shutil.which("twistd") or "twistd"]


class Memcached:
    """A memcached on 127.0.0.1 that a test may kill and start again on the same port."""

    def __init__(self) -> None:
        if not os.path.exists(MEMCACHED):
            raise RuntimeError("memcached is not installed: apt-get install -y memcached")
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        on_a_free_port(self._start_on_a_new_port)

    def _start_on_a_new_port(self) -> None:
        self.port = free_port()
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # -M: refuse to store when full instead of evicting (see the README).
        args = [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-M", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        with tempfile.TemporaryFile() as errors:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errors)
            try:
                wait_for_port(self.port, self.proc)
            except RuntimeError:
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip()
                if "Address already in use" in said:
                    raise PortTaken(said) from None
                raise RuntimeError(f"memcached did not start: {said}") from None
        # What answered may be another test's process on the same port.
        client = MemcacheClient(("127.0.0.1", self.port), connect_timeout=5, timeout=5)
        try:
            pid = client.stats().get(b"pid")
        except Exception:  # not memcached at all, or silent
            pid = None
        finally:
            client.close()
        if pid != self.proc.pid:
            self.kill()
            raise PortTaken(f"another process answers on memcached's port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"flush_all\r\n")
            s.recv(100)


class Answer:
    """One HTTP answer: status, body, headers (lower-case names)."""

    def __init__(self, status: int, body: bytes, headers: Dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body!r})"


def http(url: str, method: str = "GET", data: Optional[bytes] = None,
         headers: Optional[Dict[str, str]] = None, timeout: float = 30.0,
         context: Optional[ssl.SSLContext] = None) -> Answer:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            return Answer(r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})


class Tls:
    """A server certificate and key, and the CA file a client trusts them by."""

    def __init__(self, cert: str, key: str, cafile: str) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.create_default_context(cafile=cafile)


#: What the server logs once its listeners listen (DistributexService.startService).
START_LINE = re.compile(r"\] distributex \S+: config .* listening on ")


class DistributexServer:
    """A real `twistd -n distributex` on 127.0.0.1, configured from a dict;
    over HTTPS when given `tls`."""

    def __init__(self, config: Dict[str, Any], workdir: Optional[str] = None,
                 port: Optional[int] = None, extra_args: Tuple[str, ...] = (),
                 listen: Optional[str] = None, tls: Optional[Tls] = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="dx-test-")
        self.config_path = os.path.join(self.workdir, "distributex.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.tls = tls
        self.extra_args = extra_args
        # A command the server runs under, such as faketime; set before start().
        self.prefix: Tuple[str, ...] = ()
        self.env: Optional[Dict[str, str]] = None
        self.proc: Optional[subprocess.Popen] = None

        def start_on_a_port() -> None:
            self.port = port or free_port()
            self.listen = listen or self._listen_on(self.port)
            self.log_path = os.path.join(self.workdir, f"twistd-{self.port}.log")
            self.start()

        # A port or endpoint the test chose is tried once.
        on_a_free_port(start_on_a_port, attempts=1 if port or listen else PORT_ATTEMPTS)

    def _listen_on(self, port: int) -> str:
        if self.tls is None:
            return f"tcp:{port}:interface=127.0.0.1"
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.tls.key}:certKey={self.tls.cert}"

    @property
    def url(self) -> str:
        return f"{'http' if self.tls is None else 'https'}://127.0.0.1:{self.port}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A connection to the server, TLS already negotiated if it speaks TLS."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is None:
            return sock
        return self.tls.context.wrap_socket(sock, server_hostname="127.0.0.1")

    def http(self, path_and_query: str, method: str = "GET", data: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None, timeout: float = 30.0) -> Answer:
        """One request to this server, `path_and_query` starting with a slash."""
        return http(self.url + path_and_query, method=method, data=data, headers=headers, timeout=timeout,
                    context=None if self.tls is None else self.tls.context)

    def start(self) -> None:
        """Start the server; return once it serves (its start-up line is
        logged after its listeners listen). PortTaken if its port was not free."""
        with open(self.log_path, "ab") as log:
            since = log.tell()
            self.proc = subprocess.Popen(
                [*self.prefix] + twistd_command() + ["-n", "--pidfile=", "distributex", "-c", self.config_path,
                                    "--listen", self.listen, *self.extra_args],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                env=None if self.env is None else dict(os.environ, **self.env),
                # Its own process group: a prefix such as faketime forks the
                # server, and a kill must reach the server too.
                start_new_session=True)
        # Not "the port answers": another test's server may answer on it.
        wait_until(lambda: self._started(since), timeout=30, what=f"the start-up line in {self.log_path}")

    def _started(self, since: int) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        if START_LINE.search(text):
            return True
        if self.proc is not None and self.proc.poll() is not None:
            kind = PortTaken if "Address already in use" in text else RuntimeError
            raise kind(f"the server exited with {self.proc.returncode}: {text.strip()[-2000:]}")
        return False

    def call(self, path: str, method: str = "GET", http_timeout: float = 30.0,
             headers: Optional[Dict[str, str]] = None, **params: Any) -> Answer:
        """One request; params go in the query string (`timeout` is /wait's)."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self.http(f"/{path}/?{query}", method=method, headers=headers, timeout=http_timeout)

    def metric(self, name: str) -> float:
        """One unlabelled sample of /metrics, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.http("/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
        raise KeyError(name)

    def status(self, pool: str) -> Dict[str, Any]:
        answer = self.call("status", pool=pool, format="json")
        assert "pools" in answer.json(), f"/status/ answered {answer.status}: {answer.text}\n{self.log()[-4000:]}"
        return answer.json()["pools"][0]

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        try:
            if os.getpgid(self.proc.pid) == self.proc.pid:
                os.killpg(self.proc.pid, signum)
            else:  # started by a subclass in our own group
                self.proc.send_signal(signum)
        except ProcessLookupError:
            pass
