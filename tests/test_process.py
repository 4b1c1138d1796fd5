"""The server as a process (CONTRACT.md section 1): twistd and twist, -p and
--listen, SIGTERM, configuration errors, the access log."""

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from servers import DistributexServer, free_port, http, twistd_command, wait_for_port, wait_until

pytestmark = pytest.mark.timeout(60)

POOLS = {"pools": [{"name": "pool1", "expire": 300}]}


def write_config(tmp_path, config=POOLS, text=None):
    path = tmp_path / "distributex.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(config))
    return str(path)


def twist_command():
    twistd = twistd_command()[0]
    twist = os.path.join(os.path.dirname(twistd), "twist")
    return [twist if os.path.exists(twist) else "twist"]


class Process:
    """A server started with exactly the arguments a test gives."""

    def __init__(self, args, cwd, port):
        self.port = port
        # Open for the process's lifetime; closed by kill().
        self.out = open(os.path.join(cwd, "out.log"), "wb+")  # noqa: SIM115
        self.err = open(os.path.join(cwd, "err.log"), "wb+")  # noqa: SIM115
        self.proc = subprocess.Popen(args, cwd=cwd, stdout=self.out, stderr=self.err)
        wait_for_port(port, self.proc)

    def terminate(self, timeout=15):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


@pytest.fixture
def processes():
    started = []
    yield lambda *args, **kw: started.append(Process(*args, **kw)) or started[-1]
    for process in started:
        process.kill()


def unix_http(path, request_path):
    """One GET over a unix socket; the (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET {request_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- SIGTERM ----------------------------------------------------------------------------


def test_sigterm_exits_zero(tmp_path):
    server = DistributexServer(POOLS, workdir=str(tmp_path))
    try:
        assert server.call("get", pool="pool1", host="a").body == b"YES"
        assert server.terminate() == 0
    finally:
        server.kill()


def test_sigterm_answers_every_open_wait_with_503_no_and_exits_zero(tmp_path):
    server = DistributexServer(POOLS, workdir=str(tmp_path))
    try:
        server.call("get", pool="pool1", host="holder")
        hosts = ["w1", "w2", "w3", "w4"]
        with ThreadPoolExecutor(len(hosts) + 1) as pool:
            waits = [pool.submit(server.call, "wait", pool="pool1", host=h, http_timeout=20) for h in hosts]
            json_wait = pool.submit(server.call, "wait", pool="pool1", host="w5", format="json", http_timeout=20)
            deadline = time.monotonic() + 10
            while len(server.status("pool1")["waiters"]) < len(hosts) + 1:
                assert time.monotonic() < deadline, "the waits did not queue"
                time.sleep(0.02)
            assert server.terminate() == 0
            answers = [w.result(timeout=10) for w in waits]
            json_answer = json_wait.result(timeout=10)
        assert [(a.status, a.body, a.headers["content-type"]) for a in answers] == \
            [(503, b"NO", "text/plain")] * len(hosts)
        assert all(a.headers.get("x-distributex-reason") for a in answers)
        assert json_answer.status == 503
        assert json_answer.json()["result"] == "NO" and json_answer.json()["reason"]
    finally:
        server.kill()


def test_sigterm_under_twist_exits_zero(tmp_path, processes):
    port = free_port()
    config = write_config(tmp_path)
    server = processes(twist_command() + ["distributex", "-c", config,
                                          "--listen", f"tcp:{port}:interface=127.0.0.1"],
                       cwd=str(tmp_path), port=port)
    # The port listens before the reactor runs: a SIGTERM then would meet the
    # default action, not the server. Wait for an answer first.
    wait_until(lambda: _answers(port), timeout=15, what="the server to answer")
    assert server.terminate() == 0


# -- configuration errors: one line, no traceback, never listening -------------------------


BAD_CONFIGS = {
    "yaml-error": ("pools:\n  - name: p\n    expire: [300\n", ["line 4", "YAML"]),
    "unknown-key": ("pools:\n  - name: p\n    maxlock: 2\n", ["maxlock", "unknown key"]),
    "wrong-type": ("pools:\n  - name: p\n    expire: soon\n", ["expire", "'soon'"]),
    "duplicate-pool": ("pools:\n  - name: p\n  - name: p\n", ["duplicate pool", "'p'"]),
    "missing-name": ("pools:\n  - expire: 30\n", ["pools[0]", "name"]),
    "unreadable-file": (None, ["cannot read"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_config_error_stops_the_start_with_one_line_naming_the_file_and_the_key(tmp_path, case):
    text, words = BAD_CONFIGS[case]
    if text is None:
        config = str(tmp_path / "missing.yaml")
    else:
        config = write_config(tmp_path, text=text)
    port = free_port()
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config,
                            "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=str(tmp_path), capture_output=True, check=False, timeout=30)
    stderr = result.stderr.decode()
    output = result.stdout.decode() + stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "starting on" not in output
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert config in lines[0]
    for word in words:
        assert word in lines[0]


def test_a_port_already_in_use_stops_the_start_with_one_line(tmp_path):
    config = write_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config,
                                "--listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=str(tmp_path), capture_output=True, check=False, timeout=30)
    # The logger has started by the time twistd listens: the line goes to the log.
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "distributex:" in line]
    assert len(lines) == 1 and "cannot listen" in lines[0] and str(port) in lines[0], output


def test_a_bad_endpoint_string_stops_the_start_with_one_line(tmp_path):
    config = write_config(tmp_path)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config, "--listen", "nonsense:1"],
        cwd=str(tmp_path), capture_output=True, check=False, timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in result.stdout.decode() + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "nonsense:1" in lines[0], stderr


# -- listening --------------------------------------------------------------------------------------


def test_dash_p_listens_on_that_port(tmp_path, processes):
    port = free_port()
    config = write_config(tmp_path)
    processes(twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config, "-p", str(port)],
              cwd=str(tmp_path), port=port)
    assert http(f"http://127.0.0.1:{port}/get/?pool=pool1&host=a", timeout=10).body == b"YES"


def test_repeated_listen_serves_one_set_of_pools_on_tcp_and_a_unix_socket(tmp_path, processes):
    port = free_port()
    sock_path = str(tmp_path / "dx.sock")
    config = write_config(tmp_path)
    processes(twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config,
                                  "--listen", f"tcp:{port}:interface=127.0.0.1",
                                  "--listen", f"unix:{sock_path}"],
              cwd=str(tmp_path), port=port)
    assert http(f"http://127.0.0.1:{port}/get/?pool=pool1&host=a", timeout=10).body == b"YES"
    assert unix_http(sock_path, "/get/?pool=pool1&host=b") == (200, b"NO")
    assert unix_http(sock_path, "/release/?pool=pool1&host=a") == (200, b"OK")
    assert http(f"http://127.0.0.1:{port}/get/?pool=pool1&host=b", timeout=10).body == b"YES"


def test_twist_runs_the_plugin(tmp_path, processes):
    port = free_port()
    config = write_config(tmp_path)
    processes(twist_command() + ["distributex", "-c", config, "--listen", f"tcp:{port}:interface=127.0.0.1"],
              cwd=str(tmp_path), port=port)
    assert http(f"http://127.0.0.1:{port}/get/?pool=pool1&host=a", timeout=10).body == b"YES"


def test_the_plugin_help_names_its_options(tmp_path):
    result = subprocess.run(twistd_command() + ["distributex", "--help"],
                            cwd=str(tmp_path), capture_output=True, check=False, timeout=30)
    text = result.stdout.decode()
    assert result.returncode == 0
    for option in ("--config", "--port", "--listen", "--access-log"):
        assert option in text


# -- logs -------------------------------------------------------------------------------------------


def test_the_access_log_is_off_by_default(tmp_path):
    server = DistributexServer(POOLS, workdir=str(tmp_path))
    try:
        server.call("get", pool="pool1", host="a")
        server.terminate()
        assert "Python-urllib" not in server.log()
        assert '"GET /get/' not in server.log()
    finally:
        server.kill()


def test_the_access_log_is_on_with_the_option(tmp_path):
    server = DistributexServer(POOLS, workdir=str(tmp_path), extra_args=("--access-log",))
    try:
        server.call("get", pool="pool1", host="a")
        server.terminate()
        assert '"GET /get/?pool=pool1&host=a HTTP/1.1" 200' in server.log()
    finally:
        server.kill()


def test_pool_events_are_logged(tmp_path):
    server = DistributexServer(POOLS, workdir=str(tmp_path))
    try:
        token = server.call("get", pool="pool1", host="web3", label="nightly").headers["x-distributex-token"]
        server.call("release", pool="pool1", host="web3")
        server.terminate()
        log = server.log()
        assert f"pool=pool1 granted host=web3 token={token} label=\"nightly\"" in log
        assert f"pool=pool1 released host=web3 token={token}" in log
    finally:
        server.kill()


def _answers(port):
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
