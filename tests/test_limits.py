"""Contract section 6, limits: hostile requests get a clear answer and
change nothing; holders and open waits are never disturbed."""

import socket
import time

import pytest
from contract_helpers import RawRequest, get, holders, parse_response, queued, release, wait_for
from servers import wait_until

pytestmark = pytest.mark.timeout(60)

POOLS = [{"name": "pool1", "expire": 300}]


def raw(server, data, timeout=10.0):
    """Send bytes; the server's whole answer (it closes after a refusal)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        sock.sendall(data)
    except OSError:
        pass
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return parse_response(out)


def assert_refused(answer, status, words):
    assert (answer.status, answer.body) == (status, b"INVALID"), answer
    assert words in answer.headers["x-distributex-reason"]


@pytest.fixture
def server(start_server):
    server = start_server(POOLS)
    assert get(server, "holder").body == b"YES"
    return server


def untouched(server):
    assert holders(server) == ["holder"]
    assert get(server, "holder").body == b"YES"


def test_a_request_head_sent_too_slowly_is_answered_408_and_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    started = time.monotonic()
    sock.sendall(b"GET /get/?pool=pool1&host=slow HTTP/1.1\r\n")
    answer = b""
    for byte in b"Host: x\r\nX-Slow: " + b"a" * 100:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.2)
        if time.monotonic() - started > 15:
            break
    sock.settimeout(5)
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except OSError:
        pass
    assert 9 < time.monotonic() - started < 15
    assert_refused(parse_response(answer), 408, "not complete within 10 s")
    untouched(server)


def test_a_request_line_over_the_limit_gets_431(server):
    answer = raw(server, b"GET /get/?pool=pool1&host=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_refused(answer, 431, "longer than 8192 bytes")
    untouched(server)


def test_headers_over_the_limit_get_431(server):
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"y" * 1000) for n in range(20))
    answer = raw(server, b"GET /get/?pool=pool1&host=a HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert_refused(answer, 431, "request head longer than 16384 bytes")
    untouched(server)


def test_a_body_announced_over_the_limit_gets_413_before_it_is_sent(server):
    answer = raw(server, b"POST /get/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: 400000000\r\n\r\npool=pool1&host=a")
    assert_refused(answer, 413, "body longer than 65536 bytes")
    untouched(server)


def test_a_chunked_body_over_the_limit_gets_413(server):
    chunk = b"x" * 8000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12))
    answer = raw(server, b"POST /get/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + body + b"0\r\n\r\n")
    assert_refused(answer, 413, "body longer than 65536 bytes")
    untouched(server)


def test_a_multipart_body_gets_415(server):
    body = (b"--b\r\nContent-Disposition: form-data; name*=utf-8''%ff%fe\r\n\r\npool1\r\n--b--\r\n")
    answer = raw(server, b"POST /get/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert_refused(answer, 415, "multipart")
    untouched(server)


def test_bare_lf_line_endings_are_answered_at_once(server):
    started = time.monotonic()
    answer = raw(server, b"GET /get/?pool=pool1&host=a HTTP/1.1\nHost: x\n\n")
    assert time.monotonic() - started < 5
    assert_refused(answer, 400, "bare LF")
    untouched(server)


def test_an_open_wait_and_its_grant_survive_a_flood_of_hostile_requests(server):
    waiting = wait_for(server, host="patient")
    queued(server, ["patient"])
    for data in (b"GET /get/?pool=pool1&host=" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/1.1\nHost: x\n\n",
                 b"POST /release/ HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n") * 20:
        raw(server, data)
    assert holders(server) == ["holder"]
    release(server, "holder")
    assert waiting.answer().body == b"YES"


def test_connections_past_the_per_client_cap_get_503_and_holders_are_untouched(start_server):
    server = start_server(POOLS, max_connections_per_client=5)
    assert get(server, "holder").body == b"YES"
    waits = [wait_for(server, host=f"w{n}") for n in range(5)]
    time.sleep(0.5)  # all five open (a status request would be a sixth)
    answer = raw(server, b"GET /get/?pool=pool1&host=x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (answer.status, answer.body) == (503, b"ERROR")
    assert "more than 5 connections from 127.0.0.1" in answer.headers["x-distributex-reason"]
    waits[0].hang_up()
    wait_until(lambda: get(server, "holder").body == b"YES", timeout=5)  # a place freed: served again
    for w in waits[1:]:
        w.hang_up()


def test_metrics_count_open_connections_and_those_refused(start_server):
    server = start_server(POOLS, max_connections_per_client=2)
    assert get(server, "holder").body == b"YES"
    waits = [wait_for(server, host=f"w{n}") for n in range(2)]
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    wait_until(lambda: raw(server, health).status == 503)
    waits[0].hang_up()
    wait_until(lambda: server.metric("distributex_connections") == 2)  # a wait and the scrape
    assert server.metric("distributex_connections_refused_total") >= 1
    waits[1].hang_up()
