"""The client's parts on their own: addresses, answers, the plans on a fake
clock, the HTTP reader, the local lock, the command line."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from typing import Callable, List, Optional, Tuple

import pytest
from twisted.internet import reactor
from twisted.trial import unittest as trial

from distributex.client import cli, locallock
from distributex.client.address import parse_server
from distributex.client.errors import (
    InvalidRequest,
    LockBusy,
    LockTimeout,
    ProtocolError,
    ServerError,
    ServerUnreachable,
)
from distributex.client.plans import (
    UNREACHABLE_PATIENCE,
    acquire_plan,
    drive,
    renewal_plan,
    run_blocking,
)
from distributex.client.protocol import Answer, Grant, Request, grant_of, verdict
from distributex.client.txlocker import TxLocker
from distributex.client.wire import _read_answer, fetch

pytestmark = pytest.mark.timeout(20)


# -- addresses ----------------------------------------------------------------

@pytest.mark.parametrize("server, port, url", [
    ("dx.example.com", None, "http://dx.example.com:9889"),
    ("dx.example.com", 9999, "http://dx.example.com:9999"),
    ("dx.example.com:7000", None, "http://dx.example.com:7000"),
    ("http://dx.example.com", None, "http://dx.example.com:80"),
    ("http://dx.example.com", 9999, "http://dx.example.com:9999"),
    ("https://dx.example.com/locks/", None, "https://dx.example.com:443/locks"),
    ("HTTP://127.0.0.1:9889", 9889, "http://127.0.0.1:9889"),
    ("::1", None, "http://[::1]:9889"),
    ("[::1]:7000", None, "http://[::1]:7000"),
])
def test_servers_parse(server: str, port: Optional[int], url: str) -> None:
    assert parse_server(server, port).url == url


@pytest.mark.parametrize("server, port", [
    ("", None), ("ftp://dx", None), ("http://dx:1", 2), ("dx/path", None),
    ("http://dx:notaport", None), ("http://", None), ("http://dx/?q=1", None),
])
def test_bad_servers_are_refused(server: str, port: Optional[int]) -> None:
    with pytest.raises(ValueError):
        parse_server(server, port)


# -- answers ------------------------------------------------------------------

def yes(token: int = 7, expire: float = 3.0) -> Answer:
    return Answer(200, b"YES", {"x-distributex-token": str(token),
                                "x-distributex-expire": str(expire)})


def no(status: int = 200) -> Answer:
    return Answer(status, b"NO", {})


def test_answers_mean_what_the_contract_says() -> None:
    assert verdict(yes()) == "YES" and verdict(no()) == "NO"
    assert verdict(Answer(200, b"OK\n", {})) == "OK"
    with pytest.raises(InvalidRequest) as invalid:
        verdict(Answer(403, b"INVALID", {"x-distributex-reason": "host not allowed"}))
    assert (invalid.value.status, invalid.value.reason) == (403, "host not allowed")
    with pytest.raises(ServerError):
        verdict(Answer(503, b"ERROR", {}))
    with pytest.raises(ServerUnreachable):
        verdict(Answer(502, b"<html>Bad Gateway</html>", {}))
    with pytest.raises(ProtocolError):
        verdict(Answer(200, b"MAYBE", {}))
    grant = grant_of(yes(42, 2.5), 10.0)
    assert (grant.token, grant.expire, grant.granted_at) == (42, 2.5, 10.0)
    with pytest.raises(ProtocolError):
        grant_of(Answer(200, b"YES", {}), 0)


# -- plans on a fake clock ------------------------------------------------------

class FakeServer:
    """Answers a plan's requests from a script, on a fake clock."""

    def __init__(self, respond: Callable[[Request, float], Answer]) -> None:
        self.now = 0.0
        self.respond = respond
        self.requests: List[Tuple[float, Request]] = []

    def clock(self) -> float:
        return self.now

    def send(self, request: Request) -> Answer:
        self.requests.append((self.now, request))
        return self.respond(request, self.now)

    def sleep(self, seconds: float) -> bool:
        self.now += seconds
        return True

    def run(self, plan: object) -> object:
        return run_blocking(drive(plan, self.send, self.sleep))  # type: ignore[arg-type]

    def times(self) -> List[float]:
        return [round(t, 3) for t, _ in self.requests]


def refuse(request: Request, now: float) -> Answer:
    raise ServerUnreachable("cannot reach it: Connection refused")


def test_wait_asks_once_and_dates_the_grant_at_its_arrival() -> None:
    server = FakeServer(lambda request, now: yes(5, 30))
    grant = server.run(acquire_plan("p", "h", clock=server.clock, label="l", timeout=60))
    assert isinstance(grant, Grant) and grant.token == 5
    [(_, request)] = server.requests
    assert (request.path, request.params) == ("/wait/", {"pool": "p", "host": "h",
                                                         "timeout": "60", "label": "l"})
    assert request.timeout is not None and request.timeout > 60


def test_nowait_and_timeout_outcomes() -> None:
    server = FakeServer(lambda request, now: no())
    with pytest.raises(LockBusy):
        server.run(acquire_plan("p", "h", clock=server.clock, nowait=True))
    assert [r.path for _, r in server.requests] == ["/get/"]
    with pytest.raises(LockTimeout):
        server.run(acquire_plan("p", "h", clock=server.clock, timeout=2))


def test_an_unreachable_server_is_retried_with_backoff_until_the_timeout() -> None:
    server = FakeServer(refuse)
    with pytest.raises(ServerUnreachable, match="tried"):
        server.run(acquire_plan("p", "h", clock=server.clock, timeout=10))
    times = server.times()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and times[-1] == 10  # a last try at the deadline
    assert all(later >= earlier * 1.2 for earlier, later in zip(gaps[:3], gaps[1:4]))
    # the timeout sent to /wait/ shrinks with the time left
    assert server.requests[-1][1].params["timeout"] == "0"


def test_without_timeout_an_unreachable_server_is_given_up_on() -> None:
    server = FakeServer(refuse)
    with pytest.raises(ServerUnreachable):
        server.run(acquire_plan("p", "h", clock=server.clock))
    assert server.times()[-1] == UNREACHABLE_PATIENCE
    server = FakeServer(refuse)
    with pytest.raises(ServerUnreachable):
        server.run(acquire_plan("p", "h", clock=server.clock, nowait=True))
    assert len(server.requests) == 1


def test_patience_counts_from_the_last_time_the_server_was_reachable() -> None:
    def respond(request: Request, now: float) -> Answer:
        if len(server.requests) == 1:  # a wait of 1000 s, then the server is gone
            server.now += 1000
            raise ServerUnreachable("no answer: connection reset", connected=True)
        return refuse(request, now)

    server = FakeServer(respond)
    with pytest.raises(ServerUnreachable):
        server.run(acquire_plan("p", "h", clock=server.clock))
    assert server.times()[-1] == pytest.approx(1000 + UNREACHABLE_PATIENCE, abs=0.01)


def test_a_server_shutting_down_is_waited_out() -> None:
    answers = iter([no(503), no(503), yes()])
    server = FakeServer(lambda request, now: next(answers))
    assert isinstance(server.run(acquire_plan("p", "h", clock=server.clock)), Grant)
    assert len(server.requests) == 3


def test_an_invalid_request_is_not_retried() -> None:
    server = FakeServer(lambda r, n: Answer(404, b"INVALID", {"x-distributex-reason": "no"}))
    with pytest.raises(InvalidRequest):
        server.run(acquire_plan("p", "h", clock=server.clock, timeout=10))
    assert len(server.requests) == 1


def renew(respond: Callable[[Request, float], Answer],
          expire: float = 3.0) -> Tuple[FakeServer, object]:
    server = FakeServer(respond)
    plan = renewal_plan("p", "h", Grant(7, expire, 0.0), clock=server.clock)
    return server, server.run(plan)


def test_renewals_come_every_third_of_the_lease_until_a_no() -> None:
    server, reason = renew(lambda request, now: yes(7) if now < 10 else no())
    assert server.times() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert {r.path for _, r in server.requests} == {"/get/"}
    assert "answered NO" in str(reason)


def test_a_renewal_with_another_token_means_the_lease_had_lapsed() -> None:
    _, reason = renew(lambda request, now: yes(8))
    assert "lapsed" in str(reason)


def test_a_refused_renewal_is_a_loss() -> None:
    _, reason = renew(lambda r, n: Answer(403, b"INVALID", {"x-distributex-reason": "go"}))
    assert "refused" in str(reason)


def test_without_a_successful_renewal_for_a_whole_lease_the_lock_is_lost() -> None:
    server, reason = renew(lambda request, now: yes(7) if now < 2.5 else refuse(request, now))
    assert server.now == pytest.approx(2 + 3)  # the last success, plus a lease
    assert "no renewal succeeded" in str(reason) and "Connection refused" in str(reason)
    assert len(server.times()) > 4  # retried sooner than every third


def test_a_failed_renewal_then_a_success_keeps_the_lock() -> None:
    def respond(request: Request, now: float) -> Answer:
        if 2 <= now < 3:  # the renewals fail for less than a lease
            return Answer(503, b"ERROR", {})
        return yes(7) if now < 20 else no()

    server, reason = renew(respond)
    assert "answered NO" in str(reason) and server.now >= 20


# -- the blocking HTTP client -------------------------------------------------------

def read_answer(raw: bytes) -> Answer:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(raw)
        theirs.shutdown(socket.SHUT_WR)
        return _read_answer(ours)


def test_answers_are_read_by_length_chunks_or_end_of_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Distributex-Token: 9\r\n"
    assert read_answer(head + b"Content-Length: 3\r\n\r\nYESextra").body == b"YES"
    chunked = read_answer(head + b"Transfer-Encoding: chunked\r\n\r\n"
                          b"2\r\nYE\r\n1\r\nS\r\n0\r\n\r\n")
    assert (chunked.status, chunked.body, chunked.headers["x-distributex-token"]) == (
        200, b"YES", "9")
    assert read_answer(b"HTTP/1.0 404 Not Found\r\n\r\nINVALID").body == b"INVALID"
    with pytest.raises(ProtocolError):
        read_answer(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ConnectionError):
        read_answer(head + b"Content-Length: 30\r\n\r\nYES")


@pytest.fixture
def black_hole() -> socket.socket:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


def test_a_server_that_does_not_answer_is_unreachable(black_hole: socket.socket) -> None:
    address = parse_server(f"127.0.0.1:{black_hole.getsockname()[1]}")
    with pytest.raises(ServerUnreachable, match="timed out"):
        fetch(address, Request("/get/", {"pool": "p", "host": "h"}, 0.2))


class TxFetchTests(trial.TestCase):
    timeout = 10

    def test_a_server_that_does_not_answer_is_unreachable(self) -> object:
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        locker = TxLocker(f"http://127.0.0.1:{listener.getsockname()[1]}", reactor)
        answering = locker.fetch(Request("/get/", {"pool": "p", "host": "h"}, 0.2))
        return self.assertFailure(answering, ServerUnreachable)


# -- the local lock ------------------------------------------------------------------

def test_local_locks_exclude_each_other(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locallock.LOCK_DIR_ENV, str(tmp_path))
    with locallock.LocalLock("a/b:c") as held:
        assert os.path.dirname(held.path) == str(tmp_path)
        assert os.path.basename(held.path) == "a%2Fb%3Ac.lock"  # one safe file name
        with pytest.raises(LockBusy):
            locallock.LocalLock("a/b:c", nowait=True)
        with pytest.raises(LockTimeout):
            locallock.LocalLock("a/b:c", timeout=0.1)
        threading.Timer(0.2, held.release).start()
        locallock.LocalLock("a/b:c", timeout=5).release()


def test_a_shared_tmp_directory_must_be_ours(tmp_path: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(locallock.LOCK_DIR_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: the per-user tmp dir
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = locallock.lock_dir()
    assert path == os.path.join(str(tmp_path), f"distributex-{os.getuid()}")
    assert os.stat(path).st_mode & 0o777 == 0o700
    os.chmod(path, 0o777)
    with pytest.raises(PermissionError):
        locallock.lock_dir()


def test_a_lock_file_of_a_dead_process_is_free(tmp_path: object,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locallock.LOCK_DIR_ENV, str(tmp_path))
    path = locallock.lock_path("p")
    with open(path, "w") as f:
        f.write("12345\n")  # what a 2014 PID file would look like: no matter
    with locallock.LocalLock("p", nowait=True):
        with open(path) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- the command line -------------------------------------------------------------------

def test_the_command_line_compat_spellings() -> None:
    options = cli.parse_args(["-H", "dx", "-r", "pool1", "-p", "9999", "-l", "backup"])
    assert (options.address.url, options.pool, options.local, options.command) == (
        "http://dx:9999", "pool1", True, "backup")
    assert (options.conflict_exit, options.grace, options.timeout, options.nowait) == (
        1, 5.0, None, False)
    options = cli.parse_args(["-r", "p", "-n", "-E", "75", "--id", "me", "-t", "2.5",
                              "--", "ls", "-l", "--", "x"])
    assert (options.argv, options.id, options.timeout, options.local) == (
        ["ls", "-l", "--", "x"], "me", 2.5, True)  # no -H: the local lock alone


@pytest.mark.parametrize("argv", [
    ["-r", "p"], ["true"], ["-r", "p", "-p", "1", "true"], ["-r", "p", "a", "--", "b"],
    ["-r", "p", "--"], ["-r", "p", "-t", "-1", "x"], ["-r", "p", "-E", "256", "x"],
    ["-r", "p", "-g", "nan", "x"], ["-H", "ftp://x", "-r", "p", "x"],
])
def test_usage_errors_exit_with_status_2(argv: List[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.parse_args(argv)
    assert exit.value.code == 2
    assert "usage:" in capsys.readouterr().err
