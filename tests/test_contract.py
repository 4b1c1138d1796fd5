"""CONTRACT.md section 3, over HTTP, against a real `twistd -n distributex`
on 127.0.0.1, on every backend, and once over HTTPS (contract section 6)."""

import email.utils
import time

import pytest
from contract_helpers import (
    assert_plain,
    get,
    holders,
    parse_response,
    queued,
    release,
    wait_for,
    waiters,
)
from conftest import BACKENDS
from servers import wait_until

pytestmark = pytest.mark.timeout(60)

POOL1 = [{"name": "pool1", "expire": 300}]


@pytest.fixture(params=[*BACKENDS, "inmemory+https"])
def backend(request):
    """Every backend over HTTP, and the in-memory one over HTTPS."""
    return request.param


# -- the 2014 session ---------------------------------------------------------------


def test_the_2014_curl_session_answers_yes_no_ok_yes_ok(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answers = [
        get(server, "acme1"),
        get(server, "acme2"),
        release(server, "acme1"),
        get(server, "acme2"),
        release(server, "acme2"),
    ]
    assert [(a.status, a.body, a.headers["content-type"]) for a in answers] == [
        (200, b"YES", "text/plain"), (200, b"NO", "text/plain"), (200, b"OK", "text/plain"),
        (200, b"YES", "text/plain"), (200, b"OK", "text/plain")]


def test_every_answer_carries_an_http_date_and_the_server_name(start_server, backend):
    server = start_server(POOL1, backend=backend)
    for answer in (get(server, "a"), release(server, "a"), server.http("/nowhere/", timeout=10)):
        sent = email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp()
        assert abs(sent - time.time()) < 5
        assert answer.headers["server"].startswith("TwistedWeb/")


def test_the_date_header_follows_the_clock(start_server, backend):
    server = start_server(POOL1, backend=backend)
    first = get(server, "a").headers["date"]
    time.sleep(1.1)
    assert get(server, "a").headers["date"] != first


# -- headers on YES -----------------------------------------------------------------


def test_a_get_yes_carries_the_token_and_expire_headers(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "a")
    assert answer.body == b"YES"
    assert int(answer.headers["x-distributex-token"]) > 0
    assert answer.headers["x-distributex-expire"] == "300"


def test_a_wait_yes_carries_the_token_and_expire_headers(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    waiting = wait_for(server, host="b")
    queued(server, ["b"])
    release(server, "a")
    answer = waiting.answer()
    assert answer.body == b"YES"
    assert int(answer.headers["x-distributex-token"]) > 0
    assert answer.headers["x-distributex-expire"] == "300"


def test_a_renewal_yes_carries_the_same_token(start_server, backend):
    server = start_server(POOL1, backend=backend)
    first = get(server, "a")
    again = get(server, "a")
    assert again.body == b"YES"
    assert again.headers["x-distributex-token"] == first.headers["x-distributex-token"]
    assert again.headers["x-distributex-expire"] == "300"


def test_no_and_ok_carry_no_token(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    assert "x-distributex-token" not in get(server, "b").headers
    assert "x-distributex-token" not in release(server, "a").headers


def test_the_expire_header_is_the_pools_lease_in_seconds(start_server, backend):
    server = start_server([{"name": "half", "expire": 0.5}, {"name": "never", "expire": 0},
                           {"name": "default"}], backend=backend)
    assert get(server, "a", pool="half").headers["x-distributex-expire"] == "0.5"
    assert get(server, "a", pool="never").headers["x-distributex-expire"] == "0"
    assert get(server, "a", pool="default").headers["x-distributex-expire"] == "1800"


def test_tokens_increase_with_every_grant(start_server, backend):
    server = start_server(POOL1, backend=backend)
    tokens = []
    for host in ("a", "b", "a", "c"):
        tokens.append(int(get(server, host).headers["x-distributex-token"]))
        release(server, host)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


def test_tokens_increase_across_a_server_restart(start_server, backend):
    server = start_server(POOL1, backend=backend)
    before = int(get(server, "a").headers["x-distributex-token"])
    release(server, "a")
    assert server.terminate() == 0
    server.start()
    after = get(server, "b")
    assert after.body == b"YES"
    assert int(after.headers["x-distributex-token"]) > before


# -- JSON -------------------------------------------------------------------------------


def test_accept_json_answers_a_json_object(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "web3", headers={"Accept": "application/json"})
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body == {"result": "YES", "pool": "pool1", "host": "web3",
                    "token": int(answer.headers["x-distributex-token"]), "expires_in": 300}


def test_format_json_answers_a_json_object(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "web3", format="json")
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["result"] == "YES"


def test_json_no_and_ok(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    no = get(server, "b", format="json")
    ok = server.call("release", pool="pool1", host="a", format="json")
    assert (no.status, no.json()["result"]) == (200, "NO")
    assert (ok.status, ok.json()["result"]) == (200, "OK")


def test_a_json_wait_yes(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = server.call("wait", pool="pool1", host="a", format="json")
    assert answer.json()["result"] == "YES"
    assert answer.json()["token"] == int(answer.headers["x-distributex-token"])


def test_a_json_error_carries_the_reason(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "a", pool="nope", headers={"Accept": "application/json"})
    assert answer.status == 404
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["result"] == "INVALID"
    assert body["reason"] == answer.headers["x-distributex-reason"]
    assert "nope" in body["reason"]


def test_format_text_answers_plain_even_when_json_is_accepted(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = get(server, "a", format="text", headers={"Accept": "application/json"})
    assert_plain(answer, 200, b"YES")


def test_status_json(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a", label="nightly backup")
    waiting = wait_for(server, host="b", label="restore")
    queued(server, ["b"])
    answer = server.call("status", pool="pool1", format="json")
    assert answer.headers["content-type"] == "application/json"
    (pool,) = answer.json()["pools"]
    assert (pool["name"], pool["maxlocks"], pool["expire"]) == ("pool1", 1, 300)
    (holder,) = pool["holders"]
    assert (holder["host"], holder["label"]) == ("a", "nightly backup")
    assert holder["token"] > 0 and 0 <= holder["held_for"] < 30 and 270 < holder["expires_in"] <= 300
    (waiter,) = pool["waiters"]
    assert (waiter["position"], waiter["host"], waiter["label"]) == (1, "b", "restore")
    assert 0 <= waiter["waited_for"] < 30
    waiting.hang_up()


# -- POST and the trailing slash ------------------------------------------------------------


def test_post_with_a_form_body_works_like_get(start_server, backend):
    server = start_server(POOL1, backend=backend)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    yes = server.http("/get/", method="POST", data=b"pool=pool1&host=a", headers=form, timeout=10)
    no = server.http("/get/", method="POST", data=b"pool=pool1&host=b", headers=form, timeout=10)
    ok = server.http("/release/", method="POST", data=b"pool=pool1&host=a", headers=form, timeout=10)
    assert [yes.body, no.body, ok.body] == [b"YES", b"NO", b"OK"]
    assert holders(server) == []


def test_post_with_a_chunked_form_body_works_like_get(start_server, backend):
    server = start_server(POOL1, backend=backend)
    body = b"pool=pool1&host=a"
    request = (b"POST /get/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    with server.connect() as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nYES")
    assert holders(server) == ["a"]


def test_post_with_the_query_string_works_like_get(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert get(server, "a", method="POST").body == b"YES"


@pytest.mark.parametrize("path", ["get", "wait", "release", "status"])
def test_the_trailing_slash_is_optional(start_server, backend, path):
    server = start_server(POOL1, backend=backend)
    answer = server.http(f"/{path}?pool=pool1&host=a", timeout=10)
    assert answer.status == 200
    assert answer.body != b"INVALID"
    if path in ("get", "wait"):
        assert answer.body == b"YES"


# -- /wait ---------------------------------------------------------------------------------


def test_a_wait_blocks_until_the_release_then_answers_yes(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    waiting = wait_for(server, host="b")
    queued(server, ["b"])
    assert not waiting.answered(within=0.3)
    release(server, "a")
    assert_plain(waiting.answer(), 200, b"YES")
    assert holders(server) == ["b"]


def test_a_wait_on_a_free_pool_answers_yes_at_once(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert server.call("wait", pool="pool1", host="a", http_timeout=5).body == b"YES"


def test_a_wait_timeout_answers_no(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    started = time.monotonic()
    answer = server.call("wait", pool="pool1", host="b", timeout="0.4", http_timeout=10)
    took = time.monotonic() - started
    assert_plain(answer, 200, b"NO")
    assert 0.35 <= took < 5


def test_a_wait_that_timed_out_leaves_the_queue(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    server.call("wait", pool="pool1", host="b", timeout="0.2", http_timeout=10)
    assert waiters(server) == []
    release(server, "a")
    assert holders(server) == []


def test_a_wait_granted_before_its_timeout_answers_yes(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    waiting = wait_for(server, host="b", timeout="30")
    queued(server, ["b"])
    release(server, "a")
    assert waiting.answer().body == b"YES"


def test_a_wait_with_timeout_zero_on_a_held_pool_answers_no(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    assert server.call("wait", pool="pool1", host="b", timeout="0", http_timeout=10).body == b"NO"


def test_waiters_are_granted_in_the_order_they_queued(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "holder")
    hosts = ["w1", "w2", "w3", "w4"]
    waits = {}
    for i, host in enumerate(hosts):
        waits[host] = wait_for(server, host=host)
        queued(server, hosts[:i + 1])
    order = []
    current = "holder"
    for _ in hosts:
        release(server, current)
        answered = [h for h in hosts if h not in order and waits[h].answered(within=0.05)]
        if not answered:
            answered = wait_until(lambda: [h for h in hosts if h not in order and waits[h].answered()])
        assert len(answered) == 1, f"several waiters answered at once: {answered}"
        assert waits[answered[0]].answer().body == b"YES"
        order.append(answered[0])
        current = answered[0]
    assert order == hosts


def test_a_get_does_not_barge_past_a_waiter(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    waiting = wait_for(server, host="w")
    queued(server, ["w"])
    release(server, "a")
    assert get(server, "barger").body == b"NO"
    assert waiting.answer().body == b"YES"
    assert holders(server) == ["w"]


def test_a_waiter_whose_socket_closes_leaves_the_queue_at_once(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    ghost = wait_for(server, host="ghost")
    queued(server, ["ghost"])
    live = wait_for(server, host="live")
    queued(server, ["ghost", "live"])
    ghost.hang_up()
    wait_until(lambda: waiters(server) == ["live"], timeout=2)
    live.hang_up()


def test_the_next_waiter_gets_the_lock_after_a_waiter_hung_up(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "a")
    ghost = wait_for(server, host="ghost")
    queued(server, ["ghost"])
    live = wait_for(server, host="live")
    queued(server, ["ghost", "live"])
    ghost.hang_up()
    release(server, "a")
    assert_plain(live.answer(timeout=5), 200, b"YES")
    status = server.status("pool1")
    assert [h["host"] for h in status["holders"]] == ["live"]
    assert status["waiters"] == []


def test_an_expired_lease_hands_the_slot_to_the_next_waiter_at_once(start_server, backend):
    server = start_server([{"name": "pool1", "expire": 1.0}], backend=backend)
    asked = time.monotonic()
    get(server, "a")
    granted = time.monotonic()  # the lease began between asked and granted
    waiting = wait_for(server, host="b")
    answer = waiting.answer(timeout=5)
    answered = time.monotonic()
    assert answer.body == b"YES"
    assert answered - asked >= 0.9, f"the waiter got the slot {answered - asked:.3f}s after a 1s lease began"
    # At once, not at a later sweep: 0.5 s is the answer's way back on a busy machine.
    late = answered - granted - 1.0
    assert late < 0.5, f"the waiter got the slot {late:.3f}s after the lease ended"


def test_a_renewal_extends_the_lease(start_server, backend):
    server = start_server([{"name": "pool1", "expire": 1.0}], backend=backend)
    get(server, "a")
    time.sleep(0.6)
    get(server, "a")
    time.sleep(0.6)  # past the first deadline, before the renewed one
    assert get(server, "b").body == b"NO"
    assert holders(server) == ["a"]


def test_a_lease_ends_without_a_renewal(start_server, backend):
    server = start_server([{"name": "pool1", "expire": 0.5}], backend=backend)
    get(server, "a")
    time.sleep(0.7)
    assert get(server, "b").body == b"YES"


# -- re-entrancy and release ---------------------------------------------------------------


def test_a_holder_asking_again_gets_yes_and_keeps_one_slot(start_server, backend):
    server = start_server([{"name": "pool1", "maxlocks": 2}], backend=backend)
    get(server, "a")
    assert get(server, "a").body == b"YES"
    assert get(server, "b").body == b"YES"
    assert get(server, "c").body == b"NO"


def test_a_holders_wait_answers_yes_at_once_with_its_token(start_server, backend):
    server = start_server(POOL1, backend=backend)
    token = get(server, "a").headers["x-distributex-token"]
    waiting = wait_for(server, host="w")
    queued(server, ["w"])
    answer = server.call("wait", pool="pool1", host="a", http_timeout=5)
    assert answer.body == b"YES"
    assert answer.headers["x-distributex-token"] == token
    assert waiters(server) == ["w"]
    waiting.hang_up()


def test_releasing_what_you_do_not_hold_answers_ok_and_changes_nothing(start_server, backend):
    server = start_server(POOL1, backend=backend)
    token = get(server, "a").headers["x-distributex-token"]
    assert_plain(release(server, "stranger"), 200, b"OK")
    assert [(h["host"], str(h["token"])) for h in server.status("pool1")["holders"]] == [("a", token)]


# -- semaphores and servers ---------------------------------------------------------------------


def test_a_semaphore_grants_maxlocks_hosts_then_says_no(start_server, backend):
    server = start_server([{"name": "pool1", "maxlocks": 3}], backend=backend)
    assert [get(server, h).body for h in ("a", "b", "c", "d")] == [b"YES", b"YES", b"YES", b"NO"]


def test_a_semaphore_waiter_gets_the_slot_any_holder_releases(start_server, backend):
    server = start_server([{"name": "pool1", "maxlocks": 2}], backend=backend)
    get(server, "a")
    get(server, "b")
    waiting = wait_for(server, host="c")
    queued(server, ["c"])
    release(server, "b")
    assert waiting.answer().body == b"YES"
    assert sorted(holders(server)) == ["a", "c"]


def test_a_host_outside_servers_gets_403_invalid(start_server, backend):
    server = start_server([{"name": "pool1", "servers": "acme1, acme2"}], backend=backend)
    for path in ("get", "wait"):
        answer = server.call(path, pool="pool1", host="acme3", http_timeout=5)
        assert_plain(answer, 403, b"INVALID")
        assert "acme3" in answer.headers["x-distributex-reason"]
    assert holders(server) == []


def test_a_host_in_servers_gets_yes(start_server, backend):
    server = start_server([{"name": "pool1", "servers": ["acme1", "acme2"]}], backend=backend)
    assert get(server, "acme2").body == b"YES"


# -- bad input: INVALID, the right status, a reason, nothing changed, still serving --------------


def raw_query(server, path, query, method="GET"):
    return server.http(f"/{path}?{query}", method=method, timeout=10)


def assert_refused_harmlessly(server, requests, status):
    """Each (path, query[, method]) gets INVALID with `status` and a reason,
    and the pool is as it was, and the server still answers."""
    first = get(server, "holder", label="job")
    assert first.body == b"YES", (first, first.headers)
    token = first.headers["x-distributex-token"]
    before = [(h["host"], h["label"], h["token"]) for h in server.status("pool1")["holders"]]
    for request in requests:
        answer = raw_query(server, *request)
        assert (answer.status, answer.body) == (status, b"INVALID"), request
        assert answer.headers["content-type"] == "text/plain"
        reason = answer.headers.get("x-distributex-reason", "")
        assert reason and "\n" not in reason, request
    after = [(h["host"], h["label"], h["token"]) for h in server.status("pool1")["holders"]]
    assert after == before
    assert server.status("pool1")["waiters"] == []
    assert get(server, "holder").headers["x-distributex-token"] == token
    assert get(server, "other").body == b"NO"


def test_a_missing_parameter_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "host=a"), ("get/", "pool=pool1"), ("get/", ""),
        ("wait/", "pool=pool1"), ("release/", "pool=pool1"), ("release/", "host=holder"),
    ], 400)


def test_a_repeated_parameter_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool1&host=a&host=b"), ("get/", "pool=pool1&pool=pool1&host=a"),
        ("wait/", "pool=pool1&host=a&host=a"), ("release/", "pool=pool1&host=holder&host=holder"),
        ("get/", "pool=pool1&host=a&label=x&label=y"),
    ], 400)


def test_an_empty_parameter_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool1&host="), ("get/", "pool=&host=a"),
        ("wait/", "pool=pool1&host="), ("release/", "pool=pool1&host="),
    ], 400)


def test_a_parameter_over_1_kib_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    long = "x" * 1025
    assert_refused_harmlessly(server, [
        ("get/", f"pool=pool1&host={long}"), ("wait/", f"pool=pool1&host={long}"),
        ("get/", f"pool={long}&host=a"), ("get/", f"pool=pool1&host=a&label={long}"),
        ("release/", f"pool=pool1&host={long}"),
    ], 400)


def test_a_parameter_of_exactly_1_kib_is_accepted(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert get(server, "h" * 1024, label="l" * 1024).body == b"YES"


def test_a_parameter_that_is_not_utf8_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool1&host=%FF"), ("get/", "pool=pool%FF&host=a"),
        ("wait/", "pool=pool1&host=%C3%28"), ("get/", "pool=pool1&host=a&label=%FE"),
        ("release/", "pool=pool1&host=%FF"), ("status/", "pool=%FF"),
    ], 400)


def test_a_parameter_with_control_characters_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool1&host=a%0Ab"), ("get/", "pool=pool1&host=a%00"),
        ("get/", "pool=pool1&host=a&label=x%0D%0AX-Evil:%201"),
    ], 400)


def test_a_utf8_host_name_is_accepted(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = raw_query(server, "get/", "pool=pool1&host=%C3%A9t%C3%A9")
    assert answer.body == b"YES"
    assert holders(server) == ["\u00e9t\u00e9"]


def test_an_unknown_path_gets_404(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("foo/", "pool=pool1&host=a"), ("get/extra", "pool=pool1&host=a"),
        ("GET/", "pool=pool1&host=a"), ("getx", "pool=pool1&host=a"),
    ], 404)


def test_an_unknown_pool_gets_404(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool2&host=a"), ("wait/", "pool=pool2&host=a"),
        ("release/", "pool=pool2&host=a"), ("status/", "pool=pool2"),
    ], 404)


def test_a_wrong_method_gets_405(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [
        ("get/", "pool=pool1&host=a", "PUT"), ("get/", "pool=pool1&host=a", "DELETE"),
        ("wait/", "pool=pool1&host=a", "PATCH"), ("release/", "pool=pool1&host=holder", "DELETE"),
        ("status/", "", "PUT"),
    ], 405)


def test_a_head_request_gets_405_and_grants_nothing(start_server, backend):
    server = start_server(POOL1, backend=backend)
    answer = server.http("/get/?pool=pool1&host=a", method="HEAD", timeout=10)
    assert answer.status == 405
    assert holders(server) == []


@pytest.mark.parametrize("timeout", ["abc", "-1", "nan", "inf", "1e999", "0x10"])
def test_a_bad_wait_timeout_gets_400(start_server, backend, timeout):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [("wait/", f"pool=pool1&host=a&timeout={timeout}")], 400)


def test_a_bad_format_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [("get/", "pool=pool1&host=a&format=xml")], 400)


def test_an_over_long_status_pool_gets_400(start_server, backend):
    # Like every other parameter; and the reason must not echo 16 KiB back.
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [("status/", "pool=" + "x" * 2000)], 400)


def test_a_status_pool_with_control_characters_gets_400(start_server, backend):
    server = start_server(POOL1, backend=backend)
    assert_refused_harmlessly(server, [("status/", "pool=a%0D%0AX-Evil:%201")], 400)


def test_the_reason_header_stays_short_for_a_huge_unknown_pool(start_server, backend):
    # A reason is one short sentence; echoing a 100 KB parameter makes an
    # answer that common clients refuse to parse (http.client: LineTooLong).
    server = start_server(POOL1, backend=backend)
    body = b"pool=" + b"x" * 100_000
    with server.connect() as sock:
        sock.sendall(b"POST /status/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer = parse_response(data)
    assert answer.body == b"INVALID"
    assert 0 < len(answer.headers.get("x-distributex-reason", "")) < 1024


# -- /status --------------------------------------------------------------------------------------


def test_status_text_lists_holders_and_waiters(start_server, backend):
    server = start_server(POOL1, backend=backend)
    token = get(server, "web3", label="nightly").headers["x-distributex-token"]
    w1 = wait_for(server, host="w1", label="first")
    queued(server, ["w1"])
    w2 = wait_for(server, host="w2")
    queued(server, ["w1", "w2"])
    answer = server.call("status", pool="pool1")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    lines = answer.text.splitlines()
    held = [line for line in lines if "web3" in line]
    assert len(held) == 1 and "pool1" in held[0] and token in held[0] and "nightly" in held[0]
    (first,) = [line for line in lines if "wait 1" in line]
    (second,) = [line for line in lines if "wait 2" in line]
    assert " w1 " in first and "first" in first
    assert " w2" in second
    w1.hang_up()
    w2.hang_up()


def test_status_without_a_pool_lists_every_pool(start_server, backend):
    server = start_server([{"name": "p1"}, {"name": "p2"}, {"name": "p3"}], backend=backend)
    answer = server.call("status", format="json")
    assert [p["name"] for p in answer.json()["pools"]] == ["p1", "p2", "p3"]


def test_status_with_a_repeated_pool_lists_those_pools_in_order(start_server, backend):
    server = start_server([{"name": "p1"}, {"name": "p2"}, {"name": "p3"}], backend=backend)
    answer = raw_query(server, "status/", "pool=p3&pool=p1&format=json")
    assert [p["name"] for p in answer.json()["pools"]] == ["p3", "p1"]


def test_status_text_shows_a_free_pool(start_server, backend):
    server = start_server(POOL1, backend=backend)
    line = [line for line in server.call("status").text.splitlines() if line.startswith("pool1")]
    assert line and "free" in line[0] and "0/1" in line[0]
