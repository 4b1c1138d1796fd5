"""The client's parts on their own: addresses, answers, the plans on a fake
clock, the HTTP reader, the local lock, the command line."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import threading
from typing import Any, Callable, Generator, List, Optional, Tuple

import pytest
from clientfixtures import wait_for
from twisted.internet import reactor

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
    Sleep,
    acquire_plan,
    drive,
    release_plan,
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


def test_one_session_names_the_holder_in_every_request() -> None:
    server = FakeServer(lambda request, now: yes(7) if request.path != "/release/"
                        else Answer(200, b"OK", {}))
    server.run(acquire_plan("p", "h", clock=server.clock, session="s1"))
    server.run(acquire_plan("p", "h", clock=server.clock, nowait=True, session="s1"))
    plan = renewal_plan("p", "h", Grant(7, 3.0, 0.0), clock=server.clock, session="s1")
    server.run(_first_steps(plan, 2))
    server.run(release_plan("p", "h", "s1"))
    assert [r.path for _, r in server.requests] == ["/wait/", "/get/", "/get/", "/release/"]
    assert all((r.params["host"], r.params["session"]) == ("h", "s1")
               for _, r in server.requests)


def _first_steps(plan: Generator[Any, Any, Any], count: int) -> Generator[Any, Any, None]:
    """The first ``count`` steps of ``plan``, answered as the plan is."""
    answer = None
    for _ in range(count):
        answer = yield plan.send(answer)


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


@pytest.mark.parametrize("failure", [
    ProtocolError("not an HTTP answer: 'hello'"),   # raised by the sending itself
    ServerError("server error (HTTP 503)"),
    ServerUnreachable("cannot reach it"),
], ids=["garbage", "error", "unreachable"])
def test_every_failure_of_a_renewal_request_is_retried_until_a_lease_passes(
        failure: Exception) -> None:
    def respond(request: Request, now: float) -> Answer:
        raise failure

    server, reason = renew(respond)
    assert "no renewal succeeded for a whole lease" in str(reason)
    assert str(failure) in str(reason)
    assert server.now == pytest.approx(3) and len(server.requests) > 2


def test_an_unexpected_failure_of_a_request_ends_the_driver_with_it() -> None:
    def respond(request: Request, now: float) -> Answer:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        renew(respond)


def test_once_stopped_the_driver_sends_nothing_more_and_ends_with_none() -> None:
    stop = threading.Event()

    def respond(request: Request, now: float) -> Answer:
        stop.set()  # the stop is asked while this renewal is on its way
        return yes(7)

    server = FakeServer(respond)
    plan = renewal_plan("p", "h", Grant(7, 3.0, 0.0), clock=server.clock)
    assert run_blocking(drive(plan, server.send, server.sleep, stop.is_set)) is None
    assert server.times() == [1]  # the renewal on its way, and nothing after it
    assert plan.gi_frame is None  # closed


def test_a_stop_during_a_pause_ends_the_pause() -> None:
    stop = threading.Event()
    pauses: List[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        stop.set()  # the release comes while the driver sleeps

    def plan() -> Generator[Any, Any, str]:
        yield Sleep(100)
        yield Request("/get/", {}, 1.0)
        return "never here"

    assert run_blocking(drive(plan(), refuse, sleep, stop.is_set)) is None
    assert pauses == [100]


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


def test_a_server_that_does_not_answer_the_twisted_flavour_is_unreachable(
        black_hole: socket.socket) -> None:
    locker = TxLocker(f"http://127.0.0.1:{black_hole.getsockname()[1]}", reactor)
    with pytest.raises(ServerUnreachable, match="no answer"):
        wait_for(locker.fetch(Request("/get/", {"pool": "p", "host": "h"}, 0.2)))


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


@pytest.fixture
def shared_parent(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A world-writable sticky directory, like /run/lock, where the shared
    lock directory is made when DISTRIBUTEX_LOCK_DIR is not set."""
    parent = tmp_path / "run-lock"
    parent.mkdir()
    parent.chmod(0o1777)
    monkeypatch.delenv(locallock.LOCK_DIR_ENV, raising=False)
    monkeypatch.setattr(locallock, "SHARED_PARENTS", (str(parent), "/nonexistent"))
    return parent


def test_the_shared_directory_is_world_writable_and_sticky_whatever_the_umask(
        shared_parent: Any) -> None:
    old = os.umask(0o077)
    try:
        path = locallock.lock_dir()
    finally:
        os.umask(old)
    assert path == str(shared_parent / "distributex")
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o1777


def test_the_shared_directory_is_the_same_for_every_user(
        shared_parent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    first = locallock.lock_dir()
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    assert locallock.lock_dir() == first


def test_without_a_sticky_world_writable_parent_the_next_one_is_used(
        tmp_path: Any, shared_parent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o755)  # as /run/lock is on some systems: root's alone
    monkeypatch.setattr(locallock, "SHARED_PARENTS", (str(private), str(shared_parent)))
    assert locallock.lock_dir() == str(shared_parent / "distributex")
    assert not (private / "distributex").exists()


def test_a_symlink_in_place_of_the_shared_directory_is_refused(
        tmp_path: Any, shared_parent: Any) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (shared_parent / "distributex").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="not a directory"):
        locallock.lock_dir()


def test_a_shared_directory_anybody_may_empty_is_refused(shared_parent: Any) -> None:
    (shared_parent / "distributex").mkdir()
    (shared_parent / "distributex").chmod(0o777)  # no sticky bit
    with pytest.raises(PermissionError, match="sticky"):
        locallock.lock_dir()


def test_lock_files_are_readable_by_everyone_whatever_the_umask(shared_parent: Any) -> None:
    old = os.umask(0o077)
    try:
        with locallock.LocalLock("p") as held:
            assert stat.S_IMODE(os.stat(held.path).st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_lock_file_readable_only_is_locked_all_the_same(shared_parent: Any) -> None:
    path = locallock.lock_path("p")
    with open(path, "w"):
        pass
    os.chmod(path, 0o444)  # as another user's file is to us
    with locallock.LocalLock("p", nowait=True):
        with pytest.raises(LockBusy):
            locallock.LocalLock("p", nowait=True)


def test_a_symlink_in_place_of_a_lock_file_is_refused(
        tmp_path: Any, shared_parent: Any) -> None:
    target = tmp_path / "target"
    target.write_text("")
    os.symlink(target, locallock.lock_path("p"))
    with pytest.raises(OSError):
        locallock.LocalLock("p", nowait=True)


def test_a_fifo_in_place_of_a_lock_file_is_refused_without_hanging(shared_parent: Any) -> None:
    os.mkfifo(locallock.lock_path("p"))
    with pytest.raises(OSError, match="not a regular file"):
        locallock.LocalLock("p", nowait=True)


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
    assert ([a.url for a in options.addresses], options.pool, options.local,
            options.command) == (["http://dx:9999"], "pool1", True, "backup")
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
    err = capsys.readouterr().err
    assert err.startswith("distributex: ") and err.endswith(" (see distributex --help)\n")
    assert err.count("\n") == 1
