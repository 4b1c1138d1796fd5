"""What the benchmarks share: the machine report, server processes, a raw HTTP client.

Every process a benchmark starts listens on 127.0.0.1 on a free port and is
stopped by the benchmark before it exits (``Processes`` is a context manager
that kills what it started, also on Ctrl-C or on an error). Only loopback
addresses are ever used as targets.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOOPBACK = "127.0.0.1"


# -- the machine ---------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> List[str]:
    import twisted
    now = datetime.datetime.now(datetime.timezone.utc)
    return [
        f"date:    {now:%Y-%m-%d %H:%M:%S} UTC",
        f"machine: {os.cpu_count()} CPU ({cpu_model()}), nproc={_nproc()}, "
        f"{_mem_gib():.0f} GiB RAM, Linux {platform.release()}",
        f"python:  {platform.python_version()} ({platform.python_implementation()}), "
        f"Twisted {twisted.__version__}",
    ]


def _nproc() -> int:
    return NPROC


try:  # taken at import, before a benchmark pins itself to one CPU
    NPROC = len(os.sched_getaffinity(0))
except AttributeError:  # pragma: no cover - not Linux
    NPROC = os.cpu_count() or 1


def _mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def code_version() -> str:
    """The commit of the tree under test, and whether the server code differs from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "distributex", "twisted"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head[:60]}" + (" + uncommitted changes in distributex/" if dirty else "")


def load_line() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])
    except OSError:
        return ""


def busy_seconds() -> Tuple[float, float]:
    """CPU seconds all CPUs have spent since boot (in processes, in irq/softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    # Loopback TCP is processed in softirq context; with IRQ time accounting
    # that time is charged to no process, so it is reported on its own.
    return (user + nice + system) / tick, (irq + softirq) / tick


def wait_quiet(max_wait: float, threshold: float = 0.10, window: float = 2.0, windows: int = 3) -> str:
    """Wait (at most ``max_wait`` s) until the machine's processes have used less
    than ``threshold`` of a CPU for ``windows`` windows in a row."""
    deadline = time.monotonic() + max_wait
    waited = time.monotonic()
    quiet = 0
    while True:
        p0, _ = busy_seconds()
        time.sleep(window)
        p1, _ = busy_seconds()
        load = (p1 - p0) / window
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= windows:
            return (f"machine quiet before start ({load * 100:.0f}% of a CPU busy over the last "
                    f"{window * windows:g} s)")
        if time.monotonic() >= deadline:
            return (f"machine still busy before start ({load * 100:.0f}% of a CPU) after waiting "
                    f"{time.monotonic() - waited:.0f} s: figures may be noisy")


class CpuWatch:
    """CPU used by everything else on the machine while a benchmark runs."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t0 = time.monotonic()
        self.own0 = _own_cpu()
        self.cpu0 = {pid: cpu_seconds(pid) for pid in self.pids}
        self.busy0 = busy_seconds()

    def report(self) -> str:
        """Call before the watched processes stop."""
        wall = time.monotonic() - self.t0
        ours = sum(cpu_seconds(pid) - c for pid, c in self.cpu0.items()) + _own_cpu() - self.own0
        procs, irq = busy_seconds()
        other = max(0.0, procs - self.busy0[0] - ours) / wall
        return (f"CPU during the run: servers+client {ours / wall * 100:.0f}%, softirq "
                f"{(irq - self.busy0[1]) / wall * 100:.0f}%, other processes {other * 100:.0f}% of a CPU")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle (shared machines)")


def print_header(title: str, extra: Sequence[str] = ()) -> None:
    print(f"== {title}")
    for line in machine_lines():
        print(line)
    print(f"code:    {code_version()}; {load_line()} at start")
    for line in extra:
        print(line)
    sys.stdout.flush()


# -- processes -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0,
                  log_path: Optional[str] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening on "
                               f"{port}{_tail(log_path)}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s{_tail(log_path)}")


def _tail(path: Optional[str], lines: int = 8) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        text = f.read().splitlines()[-lines:]
    return "\n  | " + "\n  | ".join(text) if text else ""


def python_script(name: str) -> str:
    """The real path of a console script of this Python (not a pyenv shim)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found")
    return found


def proc_status(pid: int) -> Dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_mib(pid: int) -> Tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    st = proc_status(pid)
    return int(st["VmRSS"].split()[0]) / 1024, int(st["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Processes:
    """Starts the benchmark's servers; kills every one of them on exit."""

    def __init__(self, keep_dir: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="dx-bench-")
        self.keep_dir = keep_dir
        self.procs: List[subprocess.Popen] = []
        self.memcached: Optional[subprocess.Popen] = None  # the one start_memcached started
        self.etcd: Any = None  # the cluster start_etcd started

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()
        if self.etcd is not None:
            self.etcd.stop()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(self, args: List[str], log_name: str, port: Optional[int] = None,
              cpu: Optional[int] = None, nofile: Optional[int] = None,
              cwd: Optional[str] = None, start_timeout: float = 20.0) -> subprocess.Popen:
        """Start a process with its output in a log file; wait for its port."""
        prefix: List[str] = []
        if nofile:
            prefix += ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
        if cpu is not None:
            prefix += ["taskset", "-c", str(cpu)]
        log_path = os.path.join(self.dir, log_name)
        log = open(log_path, "ab")
        proc = subprocess.Popen(prefix + args, cwd=cwd or self.dir, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        if port is not None:
            wait_for_port(port, proc, timeout=start_timeout, log_path=log_path)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, timeout=10.0)


# -- distributex servers ---------------------------------------------------------

def add_server_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributex server")
    g.add_argument("--backend", choices=("inmemory", "memcache", "etcd"), default="inmemory",
                   help="backend written into the generated config (default inmemory); etcd "
                        "starts a 3-member etcd cluster on loopback (data on tmpfs)")
    g.add_argument("--memcache", action="append", default=[], metavar="127.0.0.1:PORT",
                   help="memcached for --backend memcache (repeatable); without it the "
                        "benchmark starts its own memcached on a free loopback port")
    g.add_argument("--config", metavar="FILE",
                   help="a distributex.yaml whose top-level settings (backend, memcache_servers, "
                        "poll_interval, namespace, ...) are merged into the generated config; "
                        "the pools are always the benchmark's own")
    g.add_argument("--access-log", action="store_true",
                   help="start the server with --access-log (off by default, as in production)")
    g.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, server logs) and print its path")


def check_loopback(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if host == "localhost":
        host = LOOPBACK
    try:
        first = socket.inet_aton(host)[0]
    except OSError:
        raise SystemExit(f"{address}: give a 127.x.y.z address (only loopback targets are allowed)")
    if first != 127:
        raise SystemExit(f"{address}: only loopback (127.0.0.0/8) targets are allowed")
    return host, int(port or 11211)


def server_settings(args: argparse.Namespace, procs: Processes) -> Dict[str, Any]:
    """The top-level config keys (everything but pools) for the benchmark's servers."""
    settings: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            settings.update({k: v for k, v in (yaml.safe_load(f) or {}).items() if k != "pools"})
    if args.backend == "memcache" or settings.get("backend") == "memcache":
        settings["backend"] = "memcache"
        if args.memcache:
            servers = [args.memcache] if isinstance(args.memcache, str) else args.memcache
            for s in servers:
                check_loopback(s)
            settings.pop("memcachehost", None)
            settings.pop("memcacheport", None)
            settings["memcache_servers"] = list(servers)
        elif "memcache_servers" not in settings and "memcachehost" not in settings:
            settings["memcache_servers"] = [start_memcached(procs)]
        for s in settings.get("memcache_servers", []):
            check_loopback(s)
        if "memcachehost" in settings:
            check_loopback(f"{settings['memcachehost']}:{settings.get('memcacheport', 11211)}")
    if args.backend == "etcd" and "etcd_endpoints" not in settings:
        settings["backend"] = "etcd"
        settings["etcd_endpoints"] = start_etcd(procs)
    return settings


def start_etcd(procs: Processes) -> List[str]:
    """A 3-member etcd cluster on free loopback ports (tests/etcdcluster.py,
    etcd's default timing); its client URLs."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from etcdcluster import EtcdCluster, available

    if not available():
        raise SystemExit("etcd is not installed (apt-get install -y etcd-server)")
    procs.etcd = EtcdCluster(heartbeat_ms=100, election_ms=1000)
    return list(procs.etcd.endpoints)


def start_memcached(procs: Processes) -> str:
    memcached = shutil.which("memcached")
    if not memcached:
        raise SystemExit("memcached is not installed (apt-get install -y memcached), "
                         "or pass --memcache 127.0.0.1:PORT")
    port = free_port()
    cmd = [memcached, "-l", LOOPBACK, "-p", str(port), "-U", "0", "-m", "256", "-c", "4096"]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]
    procs.memcached = procs.spawn(cmd, f"memcached-{port}.log", port=port)
    return f"{LOOPBACK}:{port}"


class Server:
    """A `twistd -n distributex` on 127.0.0.1 with a generated config."""

    def __init__(self, procs: Processes, pools: List[Dict[str, Any]], settings: Dict[str, Any],
                 name: str = "dx", access_log: bool = False, cpu: Optional[int] = None,
                 nofile: Optional[int] = None, backlog: int = 4096,
                 wrap: Sequence[str] = (), start_timeout: float = 20.0) -> None:
        self.procs = procs
        self.port = free_port()
        self.config_path = os.path.join(procs.dir, f"{name}-{self.port}.yaml")
        config = dict(settings)
        config["pools"] = pools
        if config.get("backend", "inmemory") == "inmemory" and "state_file" not in config:
            # One state file each: servers share the benchmark's directory.
            config["state_file"] = os.path.join(procs.dir, f"{name}-{self.port}.state")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        args = list(wrap) + [python_script("twistd"), "-n", "--pidfile=", "distributex",
                             "-c", self.config_path,
                             "--listen", f"tcp:{self.port}:interface={LOOPBACK}:backlog={backlog}"]
        if access_log:
            args.append("--access-log")
        self.proc = procs.spawn(args, f"{name}-{self.port}.log", port=self.port, cpu=cpu,
                                nofile=nofile, start_timeout=start_timeout)
        self.log_path = self.proc.log_path  # type: ignore[attr-defined]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> Optional[int]:
        return self.procs.stop(self.proc)


# -- a raw HTTP/1.1 keep-alive client -------------------------------------------

def request_bytes(path: str, port: int) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n").encode()


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:60]!r})"


class ResponseParser:
    """Incremental parser for responses on one keep-alive connection (Content-Length only)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> List[Response]:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head = self.buf[:end].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + length:
                return out
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            out.append(Response(int(head[0].split()[1]), headers, body))


class Connection:
    """A blocking keep-alive connection: send a request, read one response."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = 30.0,
                 source: Optional[str] = None) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.parser = ResponseParser()
        self.pending: List[Response] = []

    def send(self, path: str) -> None:
        self.sock.sendall(request_bytes(path, self.port))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Response:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)

    def call(self, path: str) -> Response:
        self.send(path)
        return self.read()

    def close(self) -> None:
        self.sock.close()


def percentiles(samples: Sequence[float], points: Sequence[float] = (50, 90, 99)) -> Dict[str, float]:
    """Nearest-rank percentiles, plus min, max and mean."""
    s = sorted(samples)
    n = len(s)
    out: Dict[str, float] = {}
    if not n:
        return out
    for p in points:
        rank = max(1, int(-(-p * n // 100)))  # ceil(p/100 * n)
        out[f"p{p:g}"] = s[rank - 1]
    out["min"] = s[0]
    out["max"] = s[-1]
    out["mean"] = sum(s) / n
    return out
