"""distributexctl end to end, against real servers: status, follow, reset."""

import os
import subprocess
import sys
import time

import pytest
from contract_helpers import get, holders, queued, release, wait_for

pytestmark = pytest.mark.timeout(90)

POOLS = [{"name": "pool1", "expire": 300}, {"name": "pool2", "expire": 300}]
CTL = os.path.join(os.path.dirname(sys.executable), "distributexctl")


def ctl(server, *args, **kw):
    return subprocess.run([CTL, "-H", "127.0.0.1", "-p", str(server.port), *args], capture_output=True,
                          text=True, timeout=30, **kw)


def test_status_prints_the_table_of_holders_and_waiters(start_server):
    server = start_server(POOLS)
    get(server, "web3", session="s1", label="nightly backup")
    waiting = wait_for(server, host="web4")
    queued(server, ["web4"])
    result = ctl(server, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["POOL", "SLOTS", "STATE", "HOST", "SESSION"]
    assert lines[1].split()[:5] == ["pool1", "1/1", "held", "web3", "s1"]
    assert lines[1].endswith("nightly backup")
    assert lines[2].split()[:3] == ["wait", "1", "web4"]
    assert lines[3].split() == ["pool2", "0/1", "free"]
    waiting.hang_up()


def test_status_json_of_one_pool(start_server):
    import json

    server = start_server(POOLS)
    get(server, "web3")
    result = ctl(server, "status", "pool1", "--json")
    (pool,) = json.loads(result.stdout)["pools"]
    assert (pool["name"], [h["host"] for h in pool["holders"]]) == ("pool1", ["web3"])


def test_reset_force_releases_a_host_and_says_what_ended(start_server):
    server = start_server(POOLS)
    get(server, "web3", session="s1")
    result = ctl(server, "reset", "pool1", "--host", "web3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pool pool1: ended web3 (s1) token ")
    assert holders(server) == []


def test_follow_prints_one_line_per_event_and_reconnects_when_the_server_restarts(start_server):
    import queue
    import threading

    server = start_server(POOLS)
    follower = subprocess.Popen([CTL, "-H", "127.0.0.1", "-p", str(server.port), "follow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()

    def seen(word, pool, timeout):
        """Generate nothing; wait up to timeout for a line with word and pool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if word in line.split() and pool in line.split():
                return line
        return None

    try:
        time.sleep(0.5)
        get(server, "web3", label="deploy")
        line = seen("granted", "pool1", 10)
        assert line is not None and line.split()[2:5] == ["granted", "pool1", "web3"]
        assert "label='deploy'" in line
        server.kill()
        server.start()
        deadline = time.monotonic() + 20
        while True:  # probe on pool2 until the follower shows it: it is back
            assert time.monotonic() < deadline, "follow did not reconnect"
            get(server, "probe", pool="pool2")
            release(server, "probe", pool="pool2")
            if seen("released", "pool2", 1.0):
                break
        release(server, "web3")
        assert seen("released", "pool1", 10) is not None
    finally:
        follower.terminate()
        follower.wait(10)
    assert "reconnect" in follower.stderr.read()


def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run([CTL, "-H", "127.0.0.1", "-p", "9", "status"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach" in result.stderr


def test_help_gives_examples():
    result = subprocess.run([CTL, "-h"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "examples:" in result.stdout and "follow" in result.stdout
