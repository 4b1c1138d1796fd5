"""The wrapped command's supervisor, with the system calls CPython has and
without the ones PyPy 3.9 lacks (os.posix_spawnp, os.waitid): the same
exit statuses, and a stop ends the command's whole process group."""

from __future__ import annotations

import os
import threading
import time

import pytest

from distributex.client.supervise import Supervisor

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["native", "without-posix-spawnp-and-waitid"])
def supervisor(request, monkeypatch):
    if request.param != "native":
        monkeypatch.delattr(os, "posix_spawnp", raising=False)
        monkeypatch.delattr(os, "waitid", raising=False)
    return Supervisor(grace=1.0)


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("script, status", [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143)])
def test_the_exit_status_is_the_commands(supervisor, script, status):
    supervisor.spawn(["/bin/sh", "-c", script], dict(os.environ))
    assert supervisor.wait() == status


def test_a_missing_command_is_an_oserror(supervisor):
    with pytest.raises(OSError):
        supervisor.spawn(["/nonexistent/command"], dict(os.environ))


def test_a_stop_ends_the_commands_whole_group(supervisor, tmp_path):
    pid_file = tmp_path / "grandchild"
    supervisor.spawn(["/bin/sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], dict(os.environ))
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.02)
    grandchild = int(pid_file.read_text())
    threading.Timer(0.1, supervisor.stop).start()
    assert supervisor.wait() == 143
    deadline = time.monotonic() + 5
    while not gone(grandchild):
        assert time.monotonic() < deadline, "the command's child outlived the stop"
        time.sleep(0.02)
