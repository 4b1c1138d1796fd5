"""Contract guarantee 5, identity: a holder is the host, or the pair (host,
session) when a request names a session. Over HTTP, on every backend."""

import pytest
from contract_helpers import assert_plain, get, holders, queued, release, wait_for

pytestmark = pytest.mark.timeout(60)

POOL1 = [{"name": "pool1", "expire": 300}]


def token(answer):
    return int(answer.headers["x-distributex-token"])


def test_two_sessions_of_one_host_exclude_each_other(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_plain(get(server, "web1", session="run-1"), 200, b"YES")
    assert_plain(get(server, "web1", session="run-2"), 200, b"NO")


def test_a_session_asking_again_is_renewed_with_its_token(start_server, backend):
    server = start_server(POOL1, backend=backend)
    first = get(server, "web1", session="run-1")
    again = get(server, "web1", session="run-1")
    assert again.body == b"YES" and token(again) == token(first)
    assert holders(server) == ["web1"]


def test_a_host_without_session_is_another_holder_than_its_sessions(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert get(server, "web1", session="run-1").body == b"YES"
    assert get(server, "web1").body == b"NO"


def test_curl_without_session_is_reentrant_as_in_2014(start_server, backend):
    server = start_server(POOL1, backend=backend)
    first = get(server, "web1")
    again = get(server, "web1")
    assert (first.body, again.body) == (b"YES", b"YES")
    assert token(again) == token(first)


def test_a_release_ends_only_the_named_sessions_hold(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "web1", session="run-1")
    assert release(server, "web1", session="run-2", format="json").json()["released"] is False
    assert release(server, "web1", format="json").json()["released"] is False
    assert holders(server) == ["web1"]
    assert release(server, "web1", session="run-1", format="json").json()["released"] is True
    assert holders(server) == []


def test_a_waiting_session_is_granted_when_the_other_session_of_its_host_releases(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "web1", session="run-1")
    waiting = wait_for(server, host="web1", session="run-2")
    queued(server, ["web1"])
    release(server, "web1", session="run-1")
    assert_plain(waiting.answer(timeout=5), 200, b"YES")
    assert [h["session"] for h in server.status("pool1")["holders"]] == ["run-2"]


def test_status_shows_the_session_of_holders_and_waiters(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "web1", session="run-1")
    waiting = wait_for(server, host="web2", session="run-9")
    queued(server, ["web2"])
    status = server.status("pool1")
    assert [h["session"] for h in status["holders"]] == ["run-1"]
    assert [w["session"] for w in status["waiters"]] == ["run-9"]
    assert "run-1" in server.call("status").text
    waiting.hang_up()


def test_a_json_yes_names_the_session(start_server, backend):
    server = start_server(POOL1, backend=backend)
    body = get(server, "web1", session="run-1", format="json").json()
    assert (body["result"], body["session"]) == ("YES", "run-1")


def test_the_event_log_names_the_session(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "web1", session="run-1")
    from servers import wait_until
    wait_until(lambda: "granted host=web1 session=run-1" in server.log(), timeout=5)


@pytest.mark.parametrize("session", ["", "has space", "a/b", "x" * 129, "é"])
def test_a_malformed_session_gets_400_and_changes_nothing(start_server, backend, session):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "web1", session=session)
    assert_plain(answer, 400, b"INVALID")
    assert "session" in answer.headers["x-distributex-reason"]
    assert holders(server) == []
