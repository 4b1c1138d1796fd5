"""The distributex command end to end: the real command, the real server.

Each test uses its own pool of the module's server and checks at the end
that the pool is free again and, with -l, that the local lock is unlocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional

import pytest
from clientfixtures import (  # noqa: F401  (the fixtures dx and lock_dir)
    LONG,
    SHORT,
    alive,
    assert_pool_free,
    assert_unlocked,
    dx_server,
    held_by,
    hosts,
    private_lock_dir,
    read,
    release,
    run_client,
    start_client,
    start_dx,
    steal,
    stop,
    wait_all,
    wait_until,
)
from servers import ROOT, free_port

from distributex.client import locallock

pytestmark = pytest.mark.timeout(60)


def markers(path: object) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in read(path).splitlines()]  # type: ignore[misc]


def assert_no_overlap(events: list[tuple[str, str]], runs: int) -> None:
    assert len(events) == 2 * runs, events
    for start, end in zip(events[::2], events[1::2]):
        assert start[0] == "start" and end == ("end", start[1]), events


MARK = 'echo "start $DISTRIBUTEX_HOST" >> {f}; sleep 0.05; echo "end $DISTRIBUTEX_HOST" >> {f}'


# -- mutual exclusion and fairness ------------------------------------------

def test_ten_concurrent_commands_never_overlap(dx, lock_dir, tmp_path):
    log = tmp_path / "log"
    clients = [start_client(dx, "-r", "burst", "--id", f"c{i}", MARK.format(f=log))
               for i in range(10)]
    assert wait_all(clients) == [0] * 10
    assert_no_overlap(markers(log), 10)
    assert_pool_free(dx, "burst")


def test_two_runs_with_the_default_identity_exclude_each_other(dx, tmp_path):
    ready, go, ran = tmp_path / "ready", tmp_path / "go", tmp_path / "ran"
    # No --id: both send this host's FQDN, as two cron jobs of one host do.
    first = start_client(dx, "-r", "sessions",
                         f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done")
    second = None
    try:
        wait_until(ready.exists, what="the first run")
        second = start_client(dx, "-r", "sessions", f"touch {ran}")
        wait_until(lambda: ran.exists() or hosts(dx, "sessions", "waiters"),
                   what="the second run queued or running")
        assert not ran.exists(), "the second run ran inside the first"
        [holder], [waiter] = (dx.status("sessions")[which] for which in ("holders", "waiters"))
        assert holder["host"] == waiter["host"] == socket.getfqdn()
        assert holder["session"] != waiter["session"]
        go.touch()
        assert wait_all([first, second]) == [0, 0]
        assert ran.exists()
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert_pool_free(dx, "sessions")


def test_grants_follow_the_order_of_requests(dx, tmp_path):
    log = tmp_path / "log"
    clients = []
    try:
        with held_by(dx, "order", "gate"):  # every client queues behind the gate
            for i in range(10):
                clients.append(start_client(dx, "-r", "order", "--id", f"c{i}",
                                            MARK.format(f=log)))
                wait_until(lambda i=i: f"c{i}" in hosts(dx, "order", "waiters"),
                           what=f"c{i} queued")
                time.sleep(0.05)
    finally:
        statuses = wait_all(clients)
    assert statuses == [0] * 10
    events = markers(log)
    assert_no_overlap(events, 10)
    assert [host for _, host in events[::2]] == [f"c{i}" for i in range(10)]
    assert_pool_free(dx, "order")


# -- exit statuses ------------------------------------------------------------

@pytest.mark.parametrize("command, status", [
    ("exit 0", 0),
    ("exit 3", 3),
    ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
])
def test_the_exit_status_is_the_commands(dx, lock_dir, command, status):
    result = run_client(dx, "-l", "-r", "exits", command)
    assert result.returncode == status, result.stderr
    assert result.stderr == ""
    assert_pool_free(dx, "exits")
    assert_unlocked(lock_dir, "exits")


def test_an_argv_after_double_dash_runs_without_a_shell(dx):
    result = run_client(dx, "-r", "exits", "--", "printf", "%s|", "a b", "$HOME")
    assert (result.returncode, result.stdout) == (0, "a b|$HOME|")
    assert run_client(dx, "-r", "exits", "--", "/nonexistent/cmd").returncode == 127
    assert_pool_free(dx, "exits")


def test_the_command_sees_pool_holder_and_fencing_token(dx, tmp_path):
    out, go = tmp_path / "env", tmp_path / "go"
    client = start_client(dx, "-r", "env", "--id", "fenced", "--label", "nightly",
                          f'echo "$DISTRIBUTEX_POOL $DISTRIBUTEX_HOST $DISTRIBUTEX_SESSION'
                          f' $DISTRIBUTEX_TOKEN" > {out}; while [ ! -e {go} ]; do sleep 0.02; done')
    try:
        wait_until(lambda: read(out), what="the command's environment")
        [holder] = dx.status("env")["holders"]
        assert read(out).split() == ["env", "fenced", holder["session"], str(holder["token"])]
        assert (holder["host"], holder["label"]) == ("fenced", "nightly")
        go.touch()
        assert client.wait(10) == 0
    finally:
        stop(client)
    assert_pool_free(dx, "env")


# -- not obtained: the command does not run ---------------------------------

def test_nowait_skips_a_busy_pool(dx, lock_dir, tmp_path):
    ran = tmp_path / "ran"
    with held_by(dx, "skip"):
        started = time.monotonic()
        result = run_client(dx, "-l", "-n", "-r", "skip", f"touch {ran}")
        assert (result.returncode, result.stderr) == (1, "")  # quiet: cron mails output
        assert time.monotonic() - started < 5
        assert run_client(dx, "-n", "-E", "75", "-r", "skip", f"touch {ran}").returncode == 75
        assert not ran.exists()
    assert run_client(dx, "-l", "-n", "-r", "skip", f"touch {ran}").returncode == 0
    assert ran.exists()
    assert_pool_free(dx, "skip")
    assert_unlocked(lock_dir, "skip")


def test_timeout_gives_up_and_leaves_the_queue(dx, lock_dir, tmp_path):
    ran = tmp_path / "ran"
    with held_by(dx, "timeout"):
        started = time.monotonic()
        result = run_client(dx, "-l", "-t", "0.5", "-r", "timeout", f"touch {ran}")
        elapsed = time.monotonic() - started
        assert result.returncode == 1
        assert "timed out after 0.5 s" in result.stderr and result.stderr.count("\n") == 1
        assert 0.5 <= elapsed < 5
        assert not ran.exists()
        assert hosts(dx, "timeout") == ["other"]
        assert hosts(dx, "timeout", "waiters") == []
    assert_pool_free(dx, "timeout")
    assert_unlocked(lock_dir, "timeout")


def test_an_unreachable_server_is_retried_until_the_timeout(lock_dir, tmp_path):
    ran = tmp_path / "ran"
    port = str(free_port())
    started = time.monotonic()
    result = run_client(None, "-H", "127.0.0.1", "-p", port, "-l", "-t", "1", "-r", "gone",
                        f"touch {ran}")
    assert time.monotonic() - started >= 1
    assert result.returncode == 1
    assert result.stderr.startswith(f"distributex: cannot reach http://127.0.0.1:{port}")
    assert result.stderr.count("\n") == 1 and "tried" in result.stderr
    # -n tries once, -E sets the status.
    result = run_client(None, "-H", f"http://127.0.0.1:{port}", "-n", "-E", "9", "-r", "gone",
                        f"touch {ran}")
    assert result.returncode == 9 and "tried" not in result.stderr
    assert not ran.exists()
    assert_unlocked(lock_dir, "gone")


def test_an_invalid_pool_says_why_in_one_line(dx, tmp_path):
    ran = tmp_path / "ran"
    result = run_client(dx, "-r", "no-such-pool", f"touch {ran}")
    assert result.returncode == 1
    assert result.stderr == ("distributex: server refused the request (HTTP 404): "
                             "unknown pool 'no-such-pool'\n")
    assert not ran.exists()


def test_a_backend_error_says_so_in_one_line(tmp_path):
    # A memcache backend whose memcached is not there answers ERROR (503).
    server = start_dx(str(tmp_path), [{"name": "p", "expire": LONG}], backend="memcache",
                      memcache_servers=[f"127.0.0.1:{free_port()}"])
    ran = tmp_path / "ran"
    try:
        result = run_client(server, "-E", "3", "-t", "1", "-r", "p", f"touch {ran}")
    finally:
        server.kill()
    assert result.returncode == 3
    # Retried within -t, as an unreachable server is, and said at the end.
    assert result.stderr.startswith("distributex: timed out after 1 s waiting for pool 'p'")
    assert "server error (HTTP 503)" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not ran.exists()


def test_usage_errors_exit_2(dx):
    assert run_client(dx, "-r", "exits").returncode == 2  # no command
    assert run_client(dx, "exit 0").returncode == 2  # no pool
    assert run_client(dx, "-r", "exits", "-t", "soon", "true").returncode == 2
    assert run_client(None, "-H", "http://127.0.0.1:1", "-p", "2", "-r", "x", "true"
                      ).returncode == 2


def test_help_ends_with_a_crontab_example():
    result = run_client(None, "-h")
    assert result.returncode == 0
    last = result.stdout.rstrip().splitlines()[-1]
    assert last.lstrip().startswith("*/5 * * * * distributex -H ")


# -- lock lost ----------------------------------------------------------------

LEADER_AND_GRANDCHILD = (
    # The shell's child runs a loop in the background: the grandchild of the
    # client. Each records the SIGTERM it gets; the leader waits for it.
    "sh -c 'trap \"echo grandchild-term >> {f}; exit 0\" TERM;"
    " while :; do sleep 0.05; done' & gc=$!; echo $gc > {f}.pid;"
    " trap 'echo leader-term >> {f}; wait $gc; exit 143' TERM;"
    " echo ready >> {f}; wait"
)


def test_a_renewal_answered_no_stops_the_command_and_its_grandchildren(dx, tmp_path):
    events = tmp_path / "events"
    client = start_client(dx, "-r", "lost", "--id", "victim",
                          LEADER_AND_GRANDCHILD.format(f=events))
    try:
        wait_until(lambda: "ready" in read(events), what="the command")
        grandchild = int(read(f"{events}.pid"))
        # The holder's hold ends behind its back and a third party takes it:
        # its next renewal is answered NO.
        steal(dx, "lost", "victim")
        assert client.wait(SHORT + 5) == 143
        stderr = client.stderr.read()
        assert "lost the lock on pool 'lost'" in stderr and "answered NO" in stderr
        assert sorted(read(events).split()[1:]) == ["grandchild-term", "leader-term"]
        assert not alive(grandchild)
        assert hosts(dx, "lost") == ["thief"]  # the loser did not release the thief
    finally:
        stop(client)
        release(dx, "lost", "thief")
    assert_pool_free(dx, "lost")


def test_a_command_ignoring_sigterm_is_killed_after_the_grace_period(dx, tmp_path):
    ready = tmp_path / "ready"
    client = start_client(dx, "-r", "grace", "--id", "victim", "-g", "1",
                          f"trap '' TERM; touch {ready}; sleep 60")
    try:
        wait_until(ready.exists, what="the command")
        steal(dx, "grace", "victim")
        stolen = time.monotonic()
        assert client.wait(SHORT + 5) == 128 + signal.SIGKILL
        # Detected within a renewal period, then the grace period of 1 s.
        assert 1.0 <= time.monotonic() - stolen < 1.0 + SHORT / 3 + 1.5
    finally:
        stop(client)
        release(dx, "grace", "thief")
    assert_pool_free(dx, "grace")


def test_a_server_that_stopped_means_the_lock_is_lost_after_a_lease(tmp_path, lock_dir):
    server = start_dx(str(tmp_path), [{"name": "stopped", "expire": SHORT}])
    ready = tmp_path / "ready"
    client = start_client(server, "-l", "-r", "stopped", "-g", "1", f"touch {ready}; sleep 60")
    try:
        wait_until(ready.exists, what="the command")
        assert server.terminate() == 0
        stopped = time.monotonic()
        assert client.wait(SHORT + 5) == 128 + signal.SIGTERM
        # No renewal got through for a whole lease: at most a lease after
        # the server went, and not before a renewal had a chance to fail.
        assert SHORT / 3 - 0.2 < time.monotonic() - stopped < SHORT + 1.5
        assert "no renewal succeeded" in client.stderr.read()
    finally:
        stop(client)
        server.kill()
    assert_unlocked(lock_dir, "stopped")


# -- signals ------------------------------------------------------------------

# The wrapper, with SIGTERM delivered to itself at one moment of the hand-over
# from the server's grant to the wrapper's held lock.
SIGNALLED_CLIENT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from distributex.client import locker, plans

def after(function):
    def signalled(*args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before os.kill returns
        return result
    return signalled

moment = {moment!r}
if moment == "granted":     # the plan has the YES; the driver has not returned it
    plans.grant_of = after(plans.grant_of)
elif moment == "built":     # the held lock is built and renewing; acquire() is still on
    locker.HeldLock.__init__ = after(locker.HeldLock.__init__)
elif moment == "returned":  # acquire() returned the held lock; the wrapper has not kept it
    locker.Locker.acquire = after(locker.Locker.acquire)

from distributex.client.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("moment", ["granted", "built", "returned"])
def test_a_signal_between_the_grant_and_the_held_lock_releases_the_hold(dx, tmp_path, moment):
    ran = tmp_path / "ran"
    result = subprocess.run(
        [sys.executable, "-c", SIGNALLED_CLIENT.format(root=ROOT, moment=moment),
         "-H", "127.0.0.1", "-p", str(dx.port), "-r", "interrupted", f"touch {ran}"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert not ran.exists()
    assert_pool_free(dx, "interrupted")  # released before the wrapper exited

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_are_passed_to_the_command_and_the_client_waits_for_it(
        dx, lock_dir, tmp_path, signum):
    events = tmp_path / "events"
    client = start_client(dx, "-l", "-r", "signals",
                          f"trap 'echo got >> {events}; sleep 0.3; exit 7' INT TERM HUP;"
                          f" echo ready >> {events}; while :; do sleep 0.05; done")
    try:
        wait_until(lambda: "ready" in read(events), what="the command")
        client.send_signal(signum)
        assert client.wait(10) == 7  # the command's own status, after its cleanup
        assert read(events).split() == ["ready", "got"]  # exactly once
    finally:
        stop(client)
    assert_pool_free(dx, "signals")
    assert_unlocked(lock_dir, "signals")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_client_stopped_while_waiting_leaves_the_queue(dx, lock_dir, tmp_path, signum):
    ran = tmp_path / "ran"
    with held_by(dx, "waiting"):
        client = start_client(dx, "-l", "-r", "waiting", "--id", "patient", f"touch {ran}")
        try:
            wait_until(lambda: "patient" in hosts(dx, "waiting", "waiters"), what="queued")
            client.send_signal(signum)
            assert client.wait(10) == 128 + signum
            assert hosts(dx, "waiting", "waiters") == []
            assert_unlocked(lock_dir, "waiting")
        finally:
            stop(client)
    assert not ran.exists()
    assert_pool_free(dx, "waiting")


# -- the local lock -----------------------------------------------------------

def test_without_a_server_the_local_lock_alone_serialises(lock_dir, tmp_path):
    log = tmp_path / "log"
    mark = 'echo "start $$" >> {f}; sleep 0.1; echo "end $$" >> {f}'.format(f=log)
    clients = [start_client(None, "-r", "local", mark) for _ in range(4)]
    assert wait_all(clients) == [0] * 4
    assert_no_overlap(markers(log), 4)
    assert_unlocked(lock_dir, "local")


def test_the_local_lock_keeps_two_runs_on_one_host_apart(dx, lock_dir, tmp_path):
    ready = tmp_path / "ready"
    # Same host identity: the server alone would let both in (re-entrant).
    first = start_client(dx, "-l", "-r", "local", "--id", "same", f"touch {ready}; sleep 1")
    try:
        wait_until(ready.exists, what="the first run")
        second = run_client(dx, "-l", "-n", "-r", "local", "--id", "same", "true")
        assert second.returncode == 1
        assert first.wait(10) == 0
    finally:
        stop(first)
    assert_pool_free(dx, "local")
    assert_unlocked(lock_dir, "local")


OTHER_UID = 65534  # nobody


def _python_for(uid: int) -> Optional[str]:
    """An interpreter that ``uid`` can run the checkout's client with, if any."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [python, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                               "import distributex.client.cli"],
                user=uid, group=uid, extra_groups=[], capture_output=True, timeout=30)
        except OSError:
            continue
        if probe.returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the client as two users: needs root")
@pytest.mark.parametrize("first_uid, second_uid", [(0, OTHER_UID), (OTHER_UID, 0)],
                         ids=["root-then-nobody", "nobody-then-root"])
def test_the_local_lock_keeps_runs_of_two_users_apart(monkeypatch, first_uid, second_uid):
    python = _python_for(OTHER_UID)
    if python is None:
        pytest.skip(f"uid {OTHER_UID} can run no Python with the checkout {ROOT}")
    # The default directory, the one every user finds by himself: no
    # DISTRIBUTEX_LOCK_DIR. Made here first, so that root owns it.
    monkeypatch.delenv(locallock.LOCK_DIR_ENV, raising=False)
    pool = f"two-users-{os.getpid()}-{first_uid}"
    lock_file = locallock.lock_path(pool)
    shared = tempfile.mkdtemp(prefix="dx-users-")  # where both users may write
    os.chmod(shared, 0o777)
    ready, go, ran = (os.path.join(shared, name) for name in ("ready", "go", "ran"))

    def client(uid: int, *args: str, **popen: Any) -> Dict[str, Any]:
        ids = {} if uid == 0 else {"user": uid, "group": uid, "extra_groups": []}
        return dict(args=[python, os.path.join(ROOT, "client", "distributex"), *args],
                    env={k: v for k, v in os.environ.items() if k != locallock.LOCK_DIR_ENV},
                    cwd=shared, text=True, **ids, **popen)

    first = subprocess.Popen(**client(first_uid, "-l", "-r", pool,
                                      f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done",
                                      stderr=subprocess.PIPE))
    try:
        wait_until(lambda: os.path.exists(ready), what="the first user's run")
        busy = subprocess.run(**client(second_uid, "-l", "-n", "-r", pool, f"touch {ran}",
                                       capture_output=True, timeout=30))
        assert (busy.returncode, busy.stderr) == (1, ""), "not skipped as busy"
        assert not os.path.exists(ran)
        open(go, "w").close()
        assert first.wait(10) == 0, first.stderr.read()
        free = subprocess.run(**client(second_uid, "-l", "-n", "-r", pool, f"touch {ran}",
                                       capture_output=True, timeout=30))
        assert (free.returncode, free.stderr) == (0, "")
        assert os.path.exists(ran)
    finally:
        stop(first)
        shutil.rmtree(shared)
        if os.path.exists(lock_file):
            os.unlink(lock_file)


def test_the_local_lock_file_is_kept_not_deleted(lock_dir):
    assert run_client(None, "-r", "local", "true").returncode == 0
    assert os.path.exists(os.path.join(lock_dir, "local.lock"))
    assert_unlocked(lock_dir, "local")


def test_a_client_killed_outright_leaves_no_local_lock(lock_dir, tmp_path):
    pid = tmp_path / "pid"
    client = start_client(None, "-r", "local", f"echo $$ > {pid}; sleep 60",
                          stderr=subprocess.DEVNULL)
    command = int(wait_until(lambda: read(pid).strip(), what="the command"))
    try:
        client.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
        client.wait()
        assert_unlocked(lock_dir, "local")
    finally:
        os.killpg(command, signal.SIGKILL)  # the orphaned command, in its own group
