"""The lock endpoints' fast path: a plain GET to /get, /wait or /release,
answered without twisted.web's Request.

A lock cycle is two tiny requests, and twisted.web's general machinery
(line splitting, a Headers object each way, the Request's many attributes,
the response head assembled piece by piece) was most of a request's cost.
When a connection is idle and one read holds exactly one such request,
whole and unremarkable, httptools parses it and a LeanRequest, which offers
the part of twisted.web's Request that DistributexResource uses, carries it
to the same resource code and writes the answer in one piece. Everything
else (another path or method, a body, ``Connection`` or ``Expect``
headers, HTTP/1.0, a request split over reads, pipelined requests, anything
httptools refuses) goes to twisted.web exactly as before, so the hostile
input handling of channel.py is unchanged. Under PyPy, whose JIT makes
twisted.web fast and where httptools would be a C extension through its
emulation layer, httptools is not installed and every request goes to
twisted.web.

The channel treats a LeanRequest like its own requests (it is in
``channel.requests`` while it runs): the idle timeout is off while it
waits, bytes the client sends behind it are buffered and replayed after
it, a hang-up reaches it through ``connectionLost``.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString, parse_qs
from twisted.web.server import version

try:
    import httptools
except ImportError:  # PyPy: not a dependency there (see pyproject.toml)
    httptools = None  # type: ignore[assignment]

log = Logger()

#: Whether the fast path can run here.
AVAILABLE = httptools is not None

#: A lock request is a few hundred bytes; a larger read is left to
#: twisted.web, whose limits (channel.py) then apply.
MAX_LEAN_BYTES = 4096
#: The paths served on the fast path, with and without the trailing slash.
LEAN_PATHS = frozenset({b"/get", b"/get/", b"/wait", b"/wait/", b"/release", b"/release/"})
#: Request headers that ask for more than a plain answer on a kept-alive
#: connection: such a request goes to twisted.web.
_NOT_LEAN_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"expect",
                               b"upgrade", b"te", b"trailer"})

_date_cache: List[Any] = [None, b""]  # [whole second, its HTTP date]


def http_date() -> bytes:
    """Now as an HTTP date, formatted once a second."""
    second = int(time.time())
    if second != _date_cache[0]:
        _date_cache[:] = [second, datetimeToString(second)]
    return _date_cache[1]


_STATUS_LINES: Dict[int, bytes] = {}
_HEADER_NAMES: Dict[bytes, bytes] = {}


def _status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        line = _STATUS_LINES[code] = b"HTTP/1.1 %d %s\r\n" % (code, RESPONSES.get(code, b"Unknown"))
    return line


def _header_name(name: bytes) -> bytes:
    """content-type -> Content-Type, as twisted.web writes it."""
    canonical = _HEADER_NAMES.get(name)
    if canonical is None:
        canonical = _HEADER_NAMES[name] = b"-".join(part.capitalize() for part in name.split(b"-"))
    return canonical


def write_now(transport: Any, data: bytes) -> None:
    """transport.write(data), sent at once when nothing is queued ahead of it.

    Twisted's write only queues: the reactor asks the kernel to report the
    socket writable and sends on its next turn, three system calls and a
    loop iteration more per answer, a large share of a lock round trip. An
    answer of a few hundred bytes on an idle socket fits its send buffer,
    so it is sent here; the rest of it, or an error, is left to the
    transport's own write path. Plain TCP only (TLS and Unix sockets write
    through Twisted).
    """
    if (type(transport) is tcp.Server and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or a broken connection: the reactor's write path deals with it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class _Head:
    """What httptools reports of one request."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: Dict[bytes, bytes] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value  # the last one wins, as in twisted.web's getHeader

    def on_message_complete(self) -> None:
        self.complete = True


def parse(data: bytes) -> Optional[_Head]:
    """The head of the one plain lock request that ``data`` is, or None."""
    # One whole head and nothing after it (a GET has no body), no bare LF.
    if (len(data) > MAX_LEAN_BYTES or not data.startswith(b"GET /")
            or data.find(b"\r\n\r\n") != len(data) - 4 or data.count(b"\n") != data.count(b"\r\n")):
        return None
    path = data[4:data.find(b" ", 4)].partition(b"?")[0]
    if path not in LEAN_PATHS:
        return None
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return None
    if (not head.complete or parser.get_http_version() != "1.1" or not parser.should_keep_alive()
            or not _NOT_LEAN_HEADERS.isdisjoint(head.headers)):
        return None
    return head


class LeanRequest:
    """One fast-path request: the subset of twisted.web's Request that
    DistributexResource's lock endpoints use, answered in one write."""

    method = b"GET"
    long_poll = False
    access: Any = None
    finished = False
    _disconnected = False
    code = 200

    def __init__(self, channel: Any, head: _Head) -> None:
        self.channel = channel
        self.uri = head.url
        self.path, _, query = head.url.partition(b"?")
        self.args = parse_qs(query, 1) if query else {}
        self._headers = head.headers
        self._out: Dict[bytes, bytes] = {}
        self._body: List[bytes] = []
        self._watchers: List[Deferred[None]] = []

    def process(self, resource: Any) -> None:
        try:
            resource.render(self)
        except BaseException:
            log.failure("answering {uri}", Failure(), uri=self.uri)
            if not self.finished and not self._disconnected:
                self.code = 500
                self._out = {b"content-type": b"text/plain"}
                self._body = [b"ERROR"]
                self.finish()

    # -- what the resource reads -------------------------------------------------

    def getHeader(self, name: bytes) -> Optional[bytes]:
        return self._headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return self.channel.transport.getPeer()

    def notifyFinish(self) -> "Deferred[None]":
        """Fires when the answer is written, fails when the client hung up first."""
        d: Deferred[None] = Deferred()
        if self._disconnected:
            d.errback(Failure(ConnectionError("connection lost")))
        elif self.finished:
            d.callback(None)
        else:
            self._watchers.append(d)
        return d

    # -- the answer ------------------------------------------------------------

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self._out[name.lower()] = value

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        self.finished = True
        body = b"".join(self._body)
        out = self._out
        if b"content-length" not in out:
            out[b"content-length"] = b"%d" % len(body)
        parts = [_status_line(self.code), b"Server: ", version, b"\r\nDate: ", http_date(), b"\r\n"]
        for name, value in out.items():
            parts += (_header_name(name), b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        channel = self.channel
        write_now(channel.transport, b"".join(parts))
        channel.lean_done(self)
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            d.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        """The client hung up before the answer (from HTTPChannel.connectionLost)."""
        self._disconnected = True
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            d.errback(reason)
