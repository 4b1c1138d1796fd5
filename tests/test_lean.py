"""The lock endpoints' fast path (distributex/lean.py): the same answers as
through twisted.web, for the requests it takes, and everything else left
to twisted.web."""

import re

import pytest

pytest.importorskip("httptools", reason="the fast path runs where httptools is installed (CPython)")

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from distributex import lean  # noqa: E402
from distributex.backend.memory import InMemoryBackend  # noqa: E402
from distributex.catalog import Catalog, PoolSpec  # noqa: E402
from distributex.web import DistributexRequest, DistributexResource, DistributexSite  # noqa: E402


def get(target: str, *headers: str) -> bytes:
    return ("GET " + target + " HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


class Server:
    """A real resource and in-memory backend behind a DistributexSite, on a
    Clock, with connections over in-memory transports; counts the requests
    each path served."""

    def __init__(self, access_log: bool = False) -> None:
        self.clock = Clock()
        pools = Catalog({"p": PoolSpec("p", expire=30), "sem": PoolSpec("sem", maxlocks=2, expire=30)})
        self.backend = InMemoryBackend(pools, self.clock)
        self.site = DistributexSite(DistributexResource(self.backend, pools, self.clock), reactor=self.clock,
                                    access_log=access_log)
        self.lean = 0
        self.twisted = 0
        resource = self.site.resource
        render = resource.render

        def counting(request):
            if isinstance(request, lean.LeanRequest):
                self.lean += 1
            else:
                assert isinstance(request, DistributexRequest)
                self.twisted += 1
            return render(request)

        resource.render = counting

    def connect(self, lean_path=None):
        """A connection; ``lean_path`` forces the fast path on or off."""
        channel = self.site.buildProtocol(None)
        if lean_path is not None:
            channel.lean_path = lean_path
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport


def answers(transport: StringTransport) -> list:
    """The answers written so far, without their Date header, and clear them."""
    raw = transport.value()
    transport.clear()
    parts = [part for part in re.split(rb"(?=HTTP/1\.1 )", raw) if part]
    return [re.sub(rb"Date: [^\r]*\r\n", b"", part) for part in parts]


def free(server: Server, pool: str) -> bool:
    """Whether a newcomer is granted the pool at once (and then gives it back)."""
    channel, transport = server.connect()
    channel.dataReceived(get(f"/get/?pool={pool}&host=newcomer"))
    channel.dataReceived(get(f"/release/?pool={pool}&host=newcomer"))
    return answers(transport)[0].endswith(b"YES")


SCRIPT = [
    get("/get/?pool=p&host=a"),
    get("/get/?pool=p&host=b&format=json"),
    get("/get?pool=p&host=a&session=s1"),
    get("/get/?pool=sem&host=a&label=nightly%20run", "Accept: application/json"),
    get("/get/?pool=nope&host=a"),
    get("/get/?pool=p"),
    get("/get/?pool=p&host=a&host=b"),
    get("/get/?pool=p&host=%ff"),
    get("/wait/?pool=p&host=a&timeout=x"),
    get("/release/?pool=p&host=b"),
    get("/release/?pool=p&host=a", "Accept: application/json"),
    get("/release/?pool=sem&host=a&format=json"),
    get("/release?pool=p&host=a"),
]


def test_lock_answers_are_the_same_on_the_fast_path_and_through_twisted_web():
    fast, slow = Server(), Server()
    fast_channel, fast_transport = fast.connect(lean_path=True)
    slow_channel, slow_transport = slow.connect(lean_path=False)
    for request in SCRIPT:
        fast_channel.dataReceived(request)
        slow_channel.dataReceived(request)
        fast_answer, slow_answer = answers(fast_transport), answers(slow_transport)
        # Tokens are microseconds of the wall clock: equal in kind, not in value.
        fast_answer, slow_answer = (re.sub(rb"(X-Distributex-Token: |\"token\": )\d+", rb"\1N", a[0])
                                    for a in (fast_answer, slow_answer))
        assert fast_answer == slow_answer, request
    assert (fast.lean, fast.twisted) == (len(SCRIPT), 0)
    assert (slow.lean, slow.twisted) == (0, len(SCRIPT))


@pytest.mark.parametrize("request_bytes", [
    get("/status/"),
    get("/get/?pool=p&host=a", "Connection: close"),
    get("/get/?pool=p&host=a", "Content-Length: 0"),
    get("/get/?pool=p&host=a", "Expect: 100-continue"),
    b"GET /get/?pool=p&host=a HTTP/1.0\r\n\r\n",
    b"POST /get/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 15\r\n\r\npool=p&host=a&x",
    b"HEAD /get/?pool=p&host=a HTTP/1.1\r\nHost: x\r\n\r\n",
    get("/get/?pool=p&host=a") + get("/release/?pool=p&host=a"),  # pipelined in one read
    get("/get/?pool=p&host=" + "a" * 5000),
], ids=["status", "connection-close", "body-length", "expect", "http-1.0", "post", "head", "pipelined",
        "large"])
def test_other_requests_go_to_twisted_web(request_bytes):
    server = Server()
    channel, transport = server.connect()
    channel.dataReceived(request_bytes)
    assert transport.value().startswith(b"HTTP/1.")
    assert server.lean == 0 and server.twisted >= 1


def test_with_the_access_log_on_every_request_goes_to_twisted_web_which_logs_it():
    server = Server(access_log=True)
    channel, transport = server.connect()
    channel.dataReceived(get("/get/?pool=p&host=a"))
    assert answers(transport)[0].endswith(b"YES")
    assert (server.lean, server.twisted) == (0, 1)


def test_a_request_split_over_reads_is_answered_by_twisted_web():
    server = Server()
    channel, transport = server.connect()
    request = get("/get/?pool=p&host=a")
    channel.dataReceived(request[:10])
    channel.dataReceived(request[10:])
    assert answers(transport)[0].endswith(b"YES")
    assert (server.lean, server.twisted) == (0, 1)


def held_and_waiting(server: Server, wait: str = "/wait/?pool=p&host=b"):
    """Host a holds pool p through one connection; another sends ``wait``:
    (the holder's channel, the waiter's channel, the waiter's transport)."""
    holder, _ = server.connect()
    holder.dataReceived(get("/get/?pool=p&host=a"))
    waiter, waiter_transport = server.connect()
    waiter.dataReceived(get(wait))
    return holder, waiter, waiter_transport


def test_requests_pipelined_behind_a_fast_path_wait_are_answered_after_its_grant():
    server = Server()
    holder, waiter, waiter_transport = held_and_waiting(server)
    waiter.dataReceived(get("/release/?pool=p&host=b"))
    assert waiter_transport.value() == b""
    holder.dataReceived(get("/release/?pool=p&host=a"))
    granted, released = answers(waiter_transport)
    assert granted.endswith(b"YES") and released.endswith(b"OK")
    assert free(server, "p")


def test_a_client_that_hangs_up_during_a_fast_path_wait_leaves_the_queue():
    server = Server()
    holder, waiter, waiter_transport = held_and_waiting(server)
    assert server.lean == 2
    waiter_transport.loseConnection()
    waiter.connectionLost(ConnectionError("gone"))
    holder.dataReceived(get("/release/?pool=p&host=a"))
    assert free(server, "p")


def test_the_idle_timeout_is_off_during_a_fast_path_wait_and_back_after_it():
    server = Server()
    idle_timeout = server.site.timeOut
    holder, waiter, waiter_transport = held_and_waiting(server, "/wait/?pool=p&host=b&timeout=86400")
    server.clock.advance(idle_timeout + 1)
    assert not waiter_transport.disconnecting
    holder.dataReceived(get("/release/?pool=p&host=a"))
    assert answers(waiter_transport)[0].endswith(b"YES")
    server.clock.advance(idle_timeout + 1)
    assert waiter_transport.disconnecting
