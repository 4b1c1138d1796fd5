"""Contract guarantee 6, durability, on the in-memory backend: a restart of
the server, also after kill -9 at any moment, loses no hold and no token
(the state file); against real twistd processes."""

import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error

import pytest
from contract_helpers import assert_plain, get, holders, release
from servers import twistd_command

pytestmark = pytest.mark.timeout(120)

POOL1 = [{"name": "pool1", "expire": 300}]


def token(answer):
    return int(answer.headers["x-distributex-token"])


def restart_killed(server):
    server.kill()  # SIGKILL: no chance to write anything more
    server.start()


def test_a_hold_survives_kill_9_with_its_token_and_lease(start_server):
    server = start_server(POOL1)
    granted = get(server, "web1", session="s1")
    restart_killed(server)
    holder, = server.status("pool1")["holders"]
    assert (holder["host"], holder["session"], holder["token"]) == ("web1", "s1", token(granted))
    assert 290 < holder["expires_in"] <= 300
    assert_plain(get(server, "web2"), 200, b"NO")
    renewed = get(server, "web1", session="s1")
    assert renewed.body == b"YES" and token(renewed) == token(granted)


def test_a_renewal_survives_kill_9(start_server):
    server = start_server([{"name": "pool1", "expire": 8}])
    get(server, "web1")
    granted = time.monotonic()  # the lease of the grant ends before granted + 8
    time.sleep(4)
    get(server, "web1")  # renewed: 8 s from now (at least granted + 12), not from the grant
    restart_killed(server)
    # Past the grant's lease; 3 s before the renewal's, a margin for a slow restart.
    time.sleep(max(0.0, granted + 9 - time.monotonic()))
    assert holders(server) == ["web1"]


def test_a_release_survives_kill_9(start_server):
    server = start_server(POOL1)
    get(server, "web1")
    release(server, "web1")
    restart_killed(server)
    assert holders(server) == []
    assert_plain(get(server, "web2"), 200, b"YES")


def test_a_hold_whose_lease_ran_out_while_the_server_was_down_stays_expired(start_server):
    server = start_server([{"name": "pool1", "expire": 1}])
    get(server, "web1")
    server.kill()
    time.sleep(1.5)
    server.start()
    assert holders(server) == []
    assert_plain(get(server, "web2"), 200, b"YES")


def test_a_waiter_queued_before_kill_9_gets_the_hold_after_the_restart_by_asking_again(start_server):
    # The queue is not kept (its connections died with the process); the
    # hold it waited for is, so the client asking again finds it busy.
    server = start_server(POOL1)
    get(server, "web1")
    restart_killed(server)
    assert_plain(server.call("wait", pool="pool1", host="web2", timeout="0.2"), 200, b"NO")
    release(server, "web1")
    assert_plain(server.call("wait", pool="pool1", host="web2", timeout="1"), 200, b"YES")


def test_tokens_never_go_backwards_after_a_restart_with_the_clock_an_hour_behind(start_server):
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (apt-get install faketime)")
    server = start_server(POOL1)
    before = token(get(server, "web1"))
    release(server, "web1")
    server.kill()
    server.prefix = ("faketime", "-f", "-1h")
    server.env = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # the wall clock alone steps back
    server.start()
    after = get(server, "web2")
    assert after.body == b"YES" and token(after) > before


def test_a_clock_stepped_back_while_down_does_not_stretch_a_lease_after_a_reboot(start_server):
    # A reboot is a new boot id: only the wall clock says how much of the
    # lease is left, and it never says more than the whole lease.
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (apt-get install faketime)")
    server = start_server([{"name": "pool1", "expire": 60}])
    get(server, "web1")
    server.kill()
    state = os.path.join(server.workdir, "distributex.state")
    with open(state) as f:
        lines = f.read().replace('"boot_id": "', '"boot_id": "another-boot-', 1)
    with open(state, "w") as f:
        f.write(lines)
    server.prefix = ("faketime", "-f", "-1h")
    server.env = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    server.start()
    holder, = server.status("pool1")["holders"]
    assert holder["expires_in"] <= 60


def test_state_file_null_keeps_nothing(start_server):
    server = start_server(POOL1, state_file=None)
    get(server, "web1")
    restart_killed(server)
    assert holders(server) == []
    assert not os.path.exists(os.path.join(server.workdir, "distributex.state"))


def test_the_state_file_is_kept_in_the_working_directory_by_default(start_server):
    server = start_server(POOL1)
    get(server, "web1", label="nightly")
    with open(os.path.join(server.workdir, "distributex.state")) as f:
        assert "nightly" in f.read()


def start_failure(tmp_path, config_text):
    config = tmp_path / "distributex.yaml"
    config.write_text(config_text)
    proc = subprocess.run(twistd_command() + ["-n", "--pidfile=", "distributex", "-c", str(config),
                                              "--listen", "tcp:0:interface=127.0.0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_foreign_state_file_stops_the_start_in_one_line(tmp_path):
    (tmp_path / "distributex.state").write_text("pools:\n  - name: pool1\n")
    status, output = start_failure(tmp_path, "pools: [{name: pool1}]\n")
    assert status != 0
    assert output.strip().splitlines() == [output.strip()]
    assert "not a distributex state file" in output and "Traceback" not in output


def test_a_damaged_state_file_stops_the_start_in_one_line(tmp_path):
    (tmp_path / "distributex.state").write_text(
        '{"distributex_state": 1, "boot_id": "x", "written_at": 0}\n[["+", "pool1"\n[]\n')
    status, output = start_failure(tmp_path, "pools: [{name: pool1}]\n")
    assert status != 0
    assert "line 2: damaged state file" in output and "Traceback" not in output


def test_an_incomplete_last_line_is_ignored(start_server):
    server = start_server(POOL1)
    get(server, "web1")
    server.kill()
    with open(os.path.join(server.workdir, "distributex.state"), "a") as f:
        f.write('[["-", "pool1", "web1"')  # a write cut short by a crash
    server.start()
    assert holders(server) == ["web1"]


def test_two_servers_cannot_share_one_state_file(start_server, tmp_path):
    server = start_server(POOL1)
    config = os.path.join(server.workdir, "distributex.yaml")
    proc = subprocess.run(twistd_command() + ["-n", "--pidfile=", "distributex", "-c", config,
                                              "--listen", "tcp:0:interface=127.0.0.1"],
                          cwd=server.workdir, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "another distributex server uses this state file" in proc.stdout + proc.stderr


# -- kill -9 at any moment ----------------------------------------------------------


class Client(threading.Thread):
    """Takes and gives back pool1 in a loop, as a careful client would: each
    acquisition in a session of its own, a release retried until answered.
    Records each critical section: (token, yes at, release first sent at)."""

    def __init__(self, server, number, stop):
        super().__init__(daemon=True)
        self.server, self.host, self.stop = server, f"c{number}", stop
        self.sections = []
        self.rng = random.Random(number)

    def call(self, path, **params):
        try:
            return self.server.call(path, http_timeout=3, pool="pool1", host=self.host, **params)
        except (OSError, urllib.error.URLError):
            return None  # the server is down: try again

    def run(self):
        while not self.stop.is_set():
            session = f"s{self.rng.getrandbits(48):x}"
            if self.rng.random() < 0.5:
                answer = self.call("get", session=session)
            else:
                answer = self.call("wait", session=session, timeout="0.5")
            if answer is None or answer.body != b"YES":
                time.sleep(0.01)
                continue
            yes_at = time.monotonic()
            # Longer than a restart takes, so that kills land inside.
            time.sleep(self.rng.uniform(0, 1.0))
            sent_at = time.monotonic()
            while self.call("release", session=session) is None:
                time.sleep(0.02)
            self.sections.append((token(answer), yes_at, sent_at))


def test_kill_9_at_any_moment_never_grants_twice_and_tokens_keep_increasing(start_server):
    # expire is longer than the test: only the state file can keep a hold.
    server = start_server([{"name": "pool1", "expire": 120}])
    stop = threading.Event()
    clients = [Client(server, n, stop) for n in range(6)]
    for c in clients:
        c.start()
    rng = random.Random(6)
    try:
        for _ in range(10):
            time.sleep(rng.uniform(0.1, 1.0))
            restart_killed(server)
        time.sleep(1.0)
    finally:
        stop.set()
        for c in clients:
            c.join(10)
    sections = sorted(s for c in clients for s in c.sections)
    assert len(sections) > 10, "too few grants to say anything"
    by_start = sorted(sections, key=lambda s: s[1])
    for (token_a, yes_a, sent_a), (token_b, yes_b, sent_b) in zip(by_start, by_start[1:]):
        assert yes_b >= sent_a, f"token {token_b} granted while {token_a} was held"
        assert token_b > token_a, f"token {token_b} after {token_a}"
