"""Short requests to etcd's JSON gateway on kept-alive HTTP/1.1 connections,
the answers parsed by httptools.

Every lock operation on etcd is one or two of these, and twisted.web's
client (an Agent: a URI parsed and an endpoint built for each request, the
answer split into lines and headers, a Response, a body protocol) cost
about as much as the backend's own work. Here a request is one write of
bytes built in one piece, and its answer one ``feed_data`` per read.

Under PyPy httptools is not installed (see pyproject.toml and lean.py) and
EtcdClient keeps using twisted.web's Agent; watches (answers that never
end) always do.

A connection carries one request at a time; a request takes an idle one
or opens a new one (TLS too: the same creator the Agent would use). An
answer that asks to close, bytes after an answer, a timeout and any error
close it. What a
failure means for the request is the caller's to judge, as for the Agent:
a connection that could not be opened never carried it (the same errors);
anything after the request was written may have been applied.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

try:
    import httptools
except ImportError:  # PyPy (see the module docstring)
    httptools = None  # type: ignore[assignment]

#: Whether this client can run here.
AVAILABLE = httptools is not None

#: Idle connections kept per endpoint: the backend runs at most one
#: transaction per pool at a time, and a few pools are busy at once.
MAX_IDLE = 32

#: (scheme, host, port) of an endpoint.
Address = Tuple[str, str, int]


class ConnectionClosed(Exception):
    """The connection ended before the whole answer came."""


class _Exchange(Protocol):
    """One connection: a request written, its answer read, then the next."""

    def __init__(self, on_idle: Callable[["_Exchange"], None], on_gone: Callable[["_Exchange"], None]) -> None:
        self.on_idle = on_idle
        self.on_gone = on_gone
        self.waiting: Optional[Deferred[Tuple[int, bytes]]] = None
        self.parser: Any = None
        self.body: List[bytes] = []
        self.complete = False
        self.stray = False
        self.keep = False
        self.status = 0
        self.gone = False
        self.closed: Deferred[None] = Deferred()

    def send(self, data: bytes) -> "Deferred[Tuple[int, bytes]]":
        """Write a request; fires with (status, body) once its answer is in."""
        self.waiting = Deferred(lambda _: self._abort())
        self.parser = httptools.HttpResponseParser(self)
        self.body = []
        self.complete = self.stray = False
        self.transport.write(data)  # type: ignore[union-attr]
        return self.waiting

    def _abort(self) -> None:
        self.waiting = None  # cancelled: the Deferred is being failed by its canceller
        self.gone = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the answer, in the same read: no request of ours
            # asked for them, so the connection is out of step; not reused.
            self.stray = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return  # a stray answer's end (see on_message_begin)
        # Asked now: the parser forgets the answer's headers once it is over.
        self.keep = self.parser.should_keep_alive()
        self.status = self.parser.get_status_code()
        self.complete = True

    # the connection

    def dataReceived(self, data: bytes) -> None:
        d = self.waiting
        if d is None or self.parser is None:
            self._fail(ConnectionClosed("etcd sent bytes that answer no request"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self.complete:
                self._fail(ValueError(f"etcd's answer is not HTTP: {e}"))
                return
            self.stray = True  # garbage after a whole answer (see on_message_begin)
        if not self.complete:
            return
        status, keep = self.status, self.keep and not self.stray
        self.waiting, self.parser = None, None
        body = b"".join(self.body)
        self.body = []
        if keep:
            self.on_idle(self)
        else:
            self.gone = True
            self.transport.loseConnection()  # type: ignore[union-attr]
        d.callback((status, body))

    def _fail(self, error: Exception) -> None:
        d, self.waiting = self.waiting, None
        self.gone = True
        self.transport.abortConnection()  # type: ignore[union-attr]
        if d is not None:
            d.errback(Failure(error))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.gone = True
        self.on_gone(self)
        d, self.waiting = self.waiting, None
        if d is not None:
            d.errback(Failure(ConnectionClosed(f"etcd closed the connection: {reason.getErrorMessage()}")))
        self.closed.callback(None)


class _OneShot(Factory):
    """connectProtocol's factory, without a "Starting factory" log line per connection."""

    noisy = False

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> _Exchange:
        return self.exchange


class LeanHTTP:
    """POST requests with JSON bodies, on a few kept-alive connections per endpoint."""

    def __init__(self, reactor: IReactorTime, tls: Optional[Callable[[bytes, int], Any]] = None) -> None:
        self.reactor = reactor
        self.tls = tls  # (hostname, port) -> a TLS connection creator, for https endpoints
        self.idle: Dict[Address, List[_Exchange]] = {}
        self.open: Set[_Exchange] = set()

    def post(self, address: Address, path: str, body: bytes, headers: bytes = b"") -> "Deferred[Tuple[int, bytes]]":
        """(status, body) of one request; ``headers`` are extra header lines, each ending in CRLF."""
        scheme, host, port = address
        name = b"[%s]" % host.encode("ascii") if ":" in host else host.encode("idna")  # an IPv6 address in brackets
        data = b"".join((
            b"POST ", path.encode("ascii"), b" HTTP/1.1\r\nHost: ", name, b":%d" % port,
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body), headers, b"\r\n", body))
        idle = self.idle.get(address)
        while idle:
            exchange = idle.pop()
            if not exchange.gone:
                return exchange.send(data)
        d: Deferred[Any] = self._connect(address)
        d.addCallback(self._send, data)
        return d

    def _send(self, exchange: _Exchange, data: bytes) -> "Deferred[Tuple[int, bytes]]":
        if exchange.gone:  # close() was called while it was being opened
            exchange.transport.abortConnection()  # type: ignore[union-attr]
            raise ConnectionClosed("closing")
        return exchange.send(data)

    def _connect(self, address: Address) -> "Deferred[_Exchange]":
        scheme, host, port = address
        endpoint: Any = HostnameEndpoint(self.reactor, host, port)
        if scheme == "https":
            if self.tls is None:
                raise ValueError(f"{host}:{port}: https with no TLS settings")
            endpoint = wrapClientTLS(self.tls(host.encode("idna"), port), endpoint)
        exchange = _Exchange(lambda e: self._idle(address, e), self._gone)
        self.open.add(exchange)
        d: Deferred[_Exchange] = endpoint.connect(_OneShot(exchange))
        d.addErrback(self._not_connected, exchange)
        return d

    def _not_connected(self, failure: Failure, exchange: _Exchange) -> Failure:
        self._gone(exchange)
        return failure

    def _idle(self, address: Address, exchange: _Exchange) -> None:
        idle = self.idle.setdefault(address, [])
        if len(idle) < MAX_IDLE:
            idle.append(exchange)
        else:
            exchange.gone = True
            exchange.transport.loseConnection()  # type: ignore[union-attr]

    def _gone(self, exchange: _Exchange) -> None:
        self.open.discard(exchange)
        for idle in self.idle.values():
            if exchange in idle:
                idle.remove(exchange)

    def close(self) -> Deferred:
        """Close every connection; fires once all are closed. One still
        being opened is closed as soon as it is; a later request opens a
        new one. Aborted, not closed gracefully: a TLS close would wait for
        the peer's answer, for ever if the endpoint went dark."""
        waits = []
        for exchange in list(self.open):
            exchange.gone = True
            if exchange.transport is not None:
                waits.append(exchange.closed)
                exchange.transport.abortConnection()  # type: ignore[attr-defined]
        self.idle.clear()
        return DeferredList(waits)
