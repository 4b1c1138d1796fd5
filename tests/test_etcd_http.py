"""The etcd client's short requests on kept-alive connections (etcd_http.py):
on a real etcd, and against loopback peers that misbehave the ways a
network and a server can (close, stall, answer garbage)."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Callable, List, cast

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import formatEvent, globalLogPublisher

from clientfixtures import spin_until, wait_for
from distributex.backend.etcd_client import Ambiguous, EtcdClient, NotSent, put_op
from distributex.backend.etcd_http import AVAILABLE
from etcdcluster import available

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)"),
              pytest.mark.skipif(not AVAILABLE, reason="httptools is not installed (PyPy: the Agent serves)")]

OK_JSON = b'{"header":{"revision":"1"}}'


class Peer(Protocol):
    """A loopback HTTP peer: ``react`` gets each read and the transport."""

    def __init__(self, react: Callable[[bytes, Any], None]) -> None:
        self.react = react

    def dataReceived(self, data: bytes) -> None:
        self.react(data, self.transport)


@pytest.fixture
def peer():
    """peer(react) -> the URL of a loopback server that reacts so; all closed after the test."""
    ports: List[Any] = []

    def start(react: Callable[[bytes, Any], None]) -> str:
        port = reactor.listenTCP(0, ServerFactory.forProtocol(lambda: Peer(react)), interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"

    yield start
    for port in ports:
        wait_for(port.stopListening())


def answer(body: bytes, close: bool = False) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


def request(client: EtcdClient, payload: Any = None) -> Any:
    return wait_for(ensureDeferred(client.request("/v3/kv/txn", payload or {})))


@pytest.fixture
def clients():
    made: List[EtcdClient] = []

    def make(endpoints: List[str], timeout: float = 2.0) -> EtcdClient:
        client = EtcdClient(endpoints, reactor, timeout=timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        wait_for(client.close())


def test_requests_to_one_endpoint_share_one_kept_alive_connection(etcd_cluster, clients):
    client = clients(etcd_cluster.endpoints[:1])
    connects = []
    connect = client.lean._connect
    client.lean._connect = lambda address: connects.append(address) or connect(address)  # type: ignore[method-assign]
    for i in range(20):
        assert request(client, {"success": [put_op(b"lean-http-test", b"%d" % i)]})["succeeded"]
    assert len(connects) == 1 and len(client.lean.open) == 1


def connections_for_two_requests(peer: Any, clients: Any, reply: bytes) -> int:
    """Two requests to a peer that writes ``reply`` to each: on how many
    connections they went (each must get the first answer in ``reply``)."""
    seen: List[Any] = []

    def react(data: bytes, transport: Any) -> None:
        seen.append(transport)
        transport.write(reply)

    client = clients([peer(react)])
    assert request(client) == {"header": {"revision": "1"}}
    assert request(client) == {"header": {"revision": "1"}}
    return len(set(seen))


def test_an_answer_that_asks_to_close_is_read_and_its_connection_not_reused(peer, clients):
    assert connections_for_two_requests(peer, clients, answer(OK_JSON, close=True)) == 2


def test_an_answer_that_keeps_alive_leaves_its_connection_for_the_next_request(peer, clients):
    assert connections_for_two_requests(peer, clients, answer(OK_JSON)) == 1


def test_a_request_that_outlives_the_timeout_is_ambiguous_and_its_connection_is_dropped(peer, clients):
    client = clients([peer(lambda data, transport: None)], timeout=0.2)
    with pytest.raises(Ambiguous, match="did not answer"):
        request(client)
    spin_until(lambda: not client.lean.open, 5, "the connection closed")


def test_a_connection_closed_before_the_answer_is_ambiguous(peer, clients):
    client = clients([peer(lambda data, transport: transport.loseConnection())])
    with pytest.raises(Ambiguous):
        request(client)
    spin_until(lambda: not client.lean.open, 5, "the connection closed")


def test_an_answer_that_is_not_http_is_ambiguous_and_its_connection_is_dropped(peer, clients):
    client = clients([peer(lambda data, transport: transport.write(b"SSH-2.0-OpenSSH\r\n\r\n"))])
    with pytest.raises(Ambiguous):
        request(client)
    spin_until(lambda: not client.lean.open, 5, "the connection closed")


def test_an_answer_in_pieces_is_put_together(peer, clients):
    def react(data: bytes, transport: Any) -> None:
        whole = answer(OK_JSON)
        for i in range(0, len(whole), 7):
            reactor.callLater(0.001 * i, transport.write, whole[i:i + 7])

    assert request(clients([peer(react)]))["header"]["revision"] == "1"


def test_bytes_after_an_answer_are_not_taken_for_it_and_its_connection_is_not_reused(peer, clients):
    second = answer(b'{"header":{"revision":"2"}}')
    assert connections_for_two_requests(peer, clients, answer(OK_JSON) + second) == 2


def test_garbage_after_an_answer_leaves_the_answer_and_drops_the_connection(peer, clients):
    assert connections_for_two_requests(peer, clients, answer(OK_JSON) + b"\x00\x01 not http\r\n\r\n") == 2


def test_an_endpoint_that_refuses_is_not_sent(clients):
    with pytest.raises(NotSent):
        request(clients([_refusing_endpoint()]))


def test_a_read_moves_on_from_a_refusing_endpoint_to_the_next(etcd_cluster, clients):
    client = clients([_refusing_endpoint(), etcd_cluster.endpoints[0]])
    assert "header" in wait_for(ensureDeferred(client.call("/v3/kv/range", {"key": "eA=="})))


def test_the_agent_serves_where_httptools_is_missing(etcd_cluster, clients):
    client = clients(etcd_cluster.endpoints[:1])
    client.lean = None
    assert request(client, {"success": [put_op(b"lean-http-test", b"agent")]})["succeeded"]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "agent"])
def test_a_timeout_while_connecting_is_not_sent(clients, lean):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the backlog: the next SYNs are dropped
    try:
        client = clients([f"http://127.0.0.1:{port}"], timeout=0.3)
        if not lean:
            client.lean = None
        with pytest.raises(NotSent, match="no connection within"):
            request(client)
    finally:
        queued.close()
        listener.close()


def _refusing_endpoint() -> str:
    """A loopback port with nothing listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_close_closes_every_connection_and_a_later_request_opens_a_new_one(etcd_cluster, clients):
    client = clients(etcd_cluster.endpoints[:1])
    request(client, {"success": []})
    wait_for(client.close())
    assert not client.lean.open
    assert request(client, {"success": []})["succeeded"]


def test_close_does_not_wait_for_a_tls_endpoint_that_stopped_answering(tls_etcd):
    files = tls_etcd.tls
    client = EtcdClient(tls_etcd.endpoints, reactor, cacert=files.ca, cert=files.cert, key=files.key)
    request(client, {"success": []})
    pid = tls_etcd.members[0].proc.pid
    os.kill(pid, signal.SIGSTOP)  # a graceful TLS close would wait for its close_notify
    try:
        wait_for(client.close(), timeout=3)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_new_connection_writes_nothing_to_the_log(etcd_cluster, clients):
    lines: List[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        request(clients(etcd_cluster.endpoints[:1]), {"success": []})
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [line for line in lines if line != "Main loop terminated."] == []  # wait_for stops the reactor
