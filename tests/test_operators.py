"""Contract section 5, the operators' endpoints, against real servers:
/events/, /metrics, /health, /, /reset/, NO reasons, reload and the start-up log."""

import gc
import json
import os
import signal
import socket
import time
import urllib.parse

import pytest
import yaml
from contract_helpers import assert_plain, get, holders, queued, release, wait_for, waiters
from prometheus_client.parser import text_string_to_metric_families
from servers import http, wait_until
from twisted.internet.testing import MemoryReactorClock

from distributex.service import SHUTDOWN_FLUSH, Options, makeService

pytestmark = pytest.mark.timeout(90)

POOLS = [{"name": "pool1", "expire": 300}, {"name": "pool2", "expire": 300}]


class EventReader:
    """A raw Server-Sent Events reader: its frames as (event, id, data)."""

    def __init__(self, server, query="", headers=(), rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", server.port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.sock.sendall(f"GET /events/?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                          f"{extra}\r\n".encode())
        self.buffer = b""
        self.head = None

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    def frames(self, count, timeout=10.0, kinds=None):
        """The next `count` events (comments and retry lines skipped)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if self.head is None:
                if b"\r\n\r\n" not in self.buffer:
                    self._fill(max(0.01, deadline - time.monotonic()))
                    continue
                self.head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            # Chunked transfer: strip the chunk sizes, keep the data.
            text = self._dechunk()
            while "\n\n" in text:
                frame, _, text = text.partition("\n\n")
                fields = dict(line.split(": ", 1) for line in frame.split("\n") if ": " in line
                              and not line.startswith(":"))
                if "data" in fields and (kinds is None or fields.get("event") in kinds):
                    out.append((fields.get("event"), fields.get("id"), json.loads(fields["data"])))
            self._text = text
            if len(out) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"only {out} within {timeout}s")
                self._fill(max(0.01, deadline - time.monotonic()))
        return out

    _text = ""

    def _dechunk(self):
        text = self._text
        while True:
            size_line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if len(rest) < size + 2:
                break
            text += rest[:size].decode()
            self.buffer = rest[size + 2:]
        return text

    def close(self):
        self.sock.close()


def events(server, count, **kw):
    reader = EventReader(server, **kw)
    return reader


# -- /events/ ---------------------------------------------------------------------


def test_events_stream_every_pool_event_in_order(start_server, backend):
    server = start_server(POOLS, backend=backend)
    reader = EventReader(server)
    time.sleep(0.2)  # subscribed before the events
    get(server, "a", session="s1", label="nightly")
    waiting = wait_for(server, host="b")
    queued(server, ["b"])
    release(server, "a", session="s1")
    waiting.answer()
    got = reader.frames(4)
    assert [(kind, data["host"]) for kind, _, data in got] == [
        ("granted", "a"), ("queued", "b"), ("released", "a"), ("granted", "b")]
    first = got[0][2]
    assert (first["pool"], first["session"], first["label"]) == ("pool1", "s1", "nightly")
    assert first["token"] > 0 and first["at"] > 1e9
    ids = [int(event_id) for _, event_id, _ in got]
    assert ids == sorted(ids) and len(set(ids)) == 4
    reader.close()


def test_events_can_be_filtered_by_pool(start_server, backend):
    server = start_server(POOLS, backend=backend)
    reader = EventReader(server, "pool=pool2")
    time.sleep(0.2)
    get(server, "a", pool="pool1")
    get(server, "b", pool="pool2")
    (kind, _, data), = reader.frames(1)
    assert (kind, data["pool"], data["host"]) == ("granted", "pool2", "b")
    reader.close()


def test_events_resume_after_the_last_event_id(start_server, backend):
    server = start_server(POOLS, backend=backend)
    reader = EventReader(server)
    time.sleep(0.2)
    get(server, "a")
    (_, last_id, _), = reader.frames(1)
    reader.close()
    release(server, "a")
    get(server, "b")
    resumed = EventReader(server, headers=[("Last-Event-ID", last_id)])
    got = resumed.frames(2)
    assert [(kind, data["host"]) for kind, _, data in got] == [("released", "a"), ("granted", "b")]
    resumed.close()


def test_a_resume_from_an_unknown_id_says_events_were_missed(start_server):
    server = start_server(POOLS)
    reader = EventReader(server, headers=[("Last-Event-ID", "12")])
    (kind, _, data), = reader.frames(1)
    assert kind == "gap" and "reload the status" in data["reason"]
    reader.close()


def test_an_unknown_pool_in_the_events_filter_gets_404(start_server):
    server = start_server(POOLS)
    assert_plain(http(f"{server.url}/events/?pool=nope"), 404, b"INVALID")


def test_a_reader_that_never_reads_is_dropped_and_the_server_keeps_serving(start_server):
    server = start_server(POOLS)
    stalled = EventReader(server, rcvbuf=4096)
    time.sleep(0.2)
    label = "x" * 1000
    conn = __import__("http.client").client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    deadline = time.monotonic() + 60
    for n in range(20_000):
        if n % 100 == 0 and "dropping an event reader" in server.log():
            break
        assert time.monotonic() < deadline, "the stalled reader was never dropped"
        conn.request("GET", f"/get/?pool=pool1&host=a&label={label}")
        conn.getresponse().read()
        conn.request("GET", "/release/?pool=pool1&host=a")
        conn.getresponse().read()
    else:
        raise AssertionError("the stalled reader was never dropped")
    assert_plain(get(server, "b"), 200, b"YES")
    # What the reader was sent ends with the event that says why.
    tail = b""
    stalled.sock.settimeout(5)
    try:
        while True:
            chunk = stalled.sock.recv(1 << 20)
            if not chunk:
                break
            tail = (tail + chunk)[-4096:]
    except (OSError, socket.timeout):
        pass
    assert b"event: dropped" in tail and b"too slow" in tail


# -- /metrics ---------------------------------------------------------------------


def test_metrics_are_prometheus_text_with_events_gauges_and_histograms(start_server, backend):
    server = start_server(POOLS, backend=backend)
    get(server, "a")
    waiting = wait_for(server, host="b")
    queued(server, ["b"])
    release(server, "a")
    waiting.answer()
    answer = http(f"{server.url}/metrics")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("distributex_pool_events_total", (("kind", "granted"), ("pool", "pool1")))] == 2
    assert samples[("distributex_pool_events_total", (("kind", "queued"), ("pool", "pool1")))] == 1
    assert samples[("distributex_holders", (("pool", "pool1"),))] == 1
    assert samples[("distributex_waiters", (("pool", "pool1"),))] == 0
    assert samples[("distributex_wait_seconds_count", (("pool", "pool1"),))] == 2
    assert samples[("distributex_hold_seconds_count", (("pool", "pool1"),))] == 1
    assert 0 <= samples[("distributex_oldest_hold_seconds", (("pool", "pool1"),))] < 60
    assert ("distributex_backend_errors_total", ()) in samples
    assert "process_resident_memory_bytes" in {s.name for f in families.values() for s in f.samples}


def test_pools_on_demand_are_counted_under_their_pattern(start_server):
    server = start_server([{"pattern": "job-*"}])
    for n in range(5):
        get(server, "a", pool=f"job-{n}")
    text = http(f"{server.url}/metrics").text
    assert 'distributex_holders{pool="job-*"} 5.0' in text
    assert "job-3" not in text


# -- /health, / ---------------------------------------------------------------------


def test_health_answers_ok_while_the_backend_answers(start_server, backend):
    server = start_server(POOLS, backend=backend)
    assert_plain(http(f"{server.url}/health"), 200, b"OK")


def test_the_page_is_served_with_a_strict_csp_and_only_its_own_assets(start_server):
    server = start_server(POOLS)
    page = http(f"{server.url}/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    import re
    for ref in re.findall(rb'(?:src|href)="([^"]+)"', page.body):
        assert ref.startswith(b"/"), ref  # same origin: works offline
        assert http(f"{server.url}{ref.decode()}").status == 200
    assert b"<script>" not in page.body and b"style=" not in page.body


# -- /reset/ ------------------------------------------------------------------------


def post(server, path, **params):
    return http(f"{server.url}/{path}/", method="POST", data=urllib.parse.urlencode(params).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_a_reset_of_a_pool_ends_every_hold_and_answers_every_waiter_no_409(start_server, backend):
    server = start_server(POOLS, backend=backend)
    get(server, "a")
    first, second = wait_for(server, host="b"), wait_for(server, host="c")
    queued(server, ["b", "c"])
    answer = post(server, "reset", pool="pool1", format="json")
    assert answer.status == 200
    body = answer.json()
    assert (body["result"], [h["host"] for h in body["ended"]], body["dropped_waiters"]) == ("OK", ["a"], 2)
    for waiting in (first, second):
        assert_plain(waiting.answer(timeout=5), 409, b"NO")
    assert holders(server) == [] and waiters(server) == []
    wait_until(lambda: "reset of pool pool1 (every hold and waiter) by 127.0.0.1" in server.log(), timeout=5)


def test_a_reset_of_one_host_ends_its_hold_and_hands_the_slot_on(start_server, backend):
    server = start_server(POOLS, backend=backend)
    get(server, "stuck", session="s9")
    waiting = wait_for(server, host="next")
    queued(server, ["next"])
    assert post(server, "reset", pool="pool1", host="stuck").status == 200
    assert_plain(waiting.answer(timeout=5), 200, b"YES")
    assert holders(server) == ["next"]


def test_a_reset_is_an_event(start_server):
    server = start_server(POOLS)
    reader = EventReader(server)
    time.sleep(0.2)
    get(server, "a")
    post(server, "reset", pool="pool1")
    assert [kind for kind, _, _ in reader.frames(2)] == ["granted", "reset"]
    reader.close()


def test_a_reset_by_get_is_refused_with_405(start_server):
    server = start_server(POOLS)
    get(server, "a")
    answer = http(f"{server.url}/reset/?pool=pool1")
    assert_plain(answer, 405, b"INVALID")
    assert holders(server) == ["a"]


# -- NO says why ----------------------------------------------------------------------


def test_a_no_says_busy_or_queued_ahead(start_server, backend):
    server = start_server(POOLS, backend=backend)
    get(server, "a")
    busy = get(server, "b")
    assert (busy.body, busy.headers["x-distributex-reason"]) == (b"NO", "busy")
    waiting = wait_for(server, host="w")
    queued(server, ["w"])
    ahead = get(server, "c", format="json")
    assert ahead.json()["reason"] == "queued ahead"
    assert ahead.headers["x-distributex-reason"] == "queued ahead"
    waiting.hang_up()


# -- reload (SIGHUP) ------------------------------------------------------------------


def rewrite(server, pools, **top):
    with open(server.config_path, "w") as f:
        yaml.safe_dump(dict(top, pools=pools), f)
    server.proc.send_signal(signal.SIGHUP)


def test_a_reload_adds_pools_and_changes_settings_without_losing_holds(start_server):
    server = start_server(POOLS)
    get(server, "a", pool="pool1")
    rewrite(server, [{"name": "pool1", "expire": 300, "maxlocks": 2}, {"name": "pool2"}, {"name": "pool3"}])
    wait_until(lambda: "reloaded" in server.log(), timeout=10)
    assert holders(server) == ["a"]
    assert_plain(get(server, "b", pool="pool1"), 200, b"YES")  # maxlocks is now 2
    assert_plain(get(server, "c", pool="pool3"), 200, b"YES")
    assert "new pools pool3" in server.log() and "changed pools pool1" in server.log()


@pytest.fixture
def sighup_default():
    """SIGHUP's default action (terminate) for one in-process test."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)
    gc.unfreeze()  # the service froze the test process's objects at its start


@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_a_sighup_reloads_from_the_moment_the_port_accepts(runner, tmp_path, monkeypatch, sighup_default):
    # A deploy script may reload as soon as the port answers: if the
    # handler came after the listener, that SIGHUP killed the server.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "distributex.yaml").write_text("pools:\n  - name: pool1\n")
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    reactor = MemoryReactorClock()
    handler_when_listening = []
    listen = reactor.listenTCP

    def listen_and_note_the_handler(*args, **kwargs):
        handler_when_listening.append(signal.getsignal(signal.SIGHUP))
        return listen(*args, **kwargs)

    reactor.listenTCP = listen_and_note_the_handler
    service = makeService(options, reactor)
    if runner == "twistd":  # twistd listens with its privileges first, then starts
        service.privilegedStartService()
    service.startService()
    service.stopService()
    reactor.advance(SHUTDOWN_FLUSH)
    assert len(handler_when_listening) == 1
    assert handler_when_listening[0] not in (signal.SIG_DFL, signal.SIG_IGN, None)


def test_a_removed_pool_refuses_new_requests_while_its_holds_and_waiters_run_out(start_server):
    server = start_server(POOLS)
    get(server, "a", pool="pool2")
    waiting = wait_for(server, pool="pool2", host="w")
    queued(server, ["w"], pool="pool2")
    rewrite(server, [{"name": "pool1", "expire": 300}])
    wait_until(lambda: "reloaded" in server.log(), timeout=10)
    assert_plain(get(server, "new", pool="pool2"), 404, b"INVALID")
    assert holders(server, pool="pool2") == ["a"]
    assert_plain(release(server, "a", pool="pool2"), 200, b"OK")
    assert_plain(waiting.answer(timeout=5), 200, b"YES")  # the waiter was not lost
    release(server, "w", pool="pool2")
    names = [p["name"] for p in server.call("status", format="json").json()["pools"]]
    assert names == ["pool1"]


def test_a_bad_file_on_reload_is_logged_in_one_line_and_changes_nothing(start_server):
    server = start_server(POOLS)
    get(server, "a")
    with open(server.config_path, "w") as f:
        f.write("pools:\n  - name: pool1\n    expir: 3\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in server.log(), timeout=10)
    line, = [l for l in server.log().splitlines() if "reload refused" in l]
    assert "pools[0].expir: unknown key" in line
    assert holders(server) == ["a"] and get(server, "b", pool="pool2").body == b"YES"


def test_the_start_up_log_says_what_runs(start_server):
    server = start_server(POOLS)
    wait_until(lambda: "backend inmemory" in server.log(), timeout=5)
    line, = [l for l in server.log().splitlines() if "backend inmemory" in l]
    assert "2 pool(s)" in line and "tcp:" in line and "access control off" in line
    assert os.path.join(server.workdir, "distributex.state") in line


# -- /status/ of many pools ------------------------------------------------------------


def test_a_status_of_many_pools_is_streamed_in_batches_and_complete(start_server):
    pools = [{"name": f"p{n:04d}"} for n in range(1200)]
    server = start_server(pools)
    get(server, "a", pool="p0777")
    answer = http(f"{server.url}/status/?format=json")
    assert answer.headers.get("transfer-encoding") == "chunked"
    body = answer.json()["pools"]
    assert [p["name"] for p in body] == [p["name"] for p in pools]
    assert [h["host"] for h in body[777]["holders"]] == ["a"]
    text = http(f"{server.url}/status/").text.splitlines()
    assert text[0].startswith("POOL") and sum(1 for line in text if line.startswith("POOL")) == 1
    assert len(text) == 1 + 1200


def test_a_status_reader_that_reads_nothing_holds_no_more_than_a_batch(start_server):
    pools = [{"name": f"p{n:04d}", "expire": 300} for n in range(3000)]
    server = start_server(pools)
    stalled = []
    for _ in range(20):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /status/?format=json HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(sock)
    start = time.monotonic()
    for _ in range(50):
        assert get(server, "a", pool="p0001").body == b"YES"
        release(server, "a", pool="p0001")
    assert time.monotonic() - start < 10
    for sock in stalled:
        sock.close()
