"""One HTTP/1.1 connection, and the limits that keep hostile ones harmless.

twisted.web parses the requests, except the plain lock requests that
distributex.lean answers on its fast path (a request it does not take
comes here unchanged); this channel adds what a lock server facing any
client needs (contract section 6, "Limits"), none of which ever
touches a holder or an open /wait:

- a request head (request line and headers) must arrive whole within
  HEAD_DEADLINE seconds of its first byte (slowloris), in at most
  MAX_HEAD_BYTES, with lines of at most MAX_LINE_BYTES: else 408 or 431;
- a body is a small form: at most MAX_BODY_BYTES (413, refused before it is
  read when its length is announced), never multipart (415);
- bare LF line endings get 400 at once, not a hang until the idle timeout;
- a client that pipelines more than MAX_PIPELINED_BEHIND_WAIT bytes behind
  its own open /wait is disconnected (twisted.web would stop reading, and
  never see it hang up);
- TCP keepalive notices a waiter whose machine vanished.

The connection caps (per client address, and a reserve of descriptors) are
the factory's: see ConnectionLimits.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from typing import Any, Dict, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from distributex import lean

log = Logger(namespace="distributex.http")

#: Slowloris: the whole head of a request within this many seconds of its
#: first byte. A real client sends it in one packet.
HEAD_DEADLINE = 10.0
#: A request line or header line longer than this is refused (431): a lock
#: request is a few hundred bytes.
MAX_LINE_BYTES = 8192
#: The whole head: request line and every header.
MAX_HEAD_BYTES = 16384
#: A form body of a few parameters of at most 1 KiB each.
MAX_BODY_BYTES = 65536
#: Bytes a client may pipeline behind an open /wait before it is taken for
#: gone or abusive: twisted.web would stop reading the socket past this
#: (its _optimisticEagerReadSize), and a socket nobody reads never reports
#: the hang-up, so the waiter would keep its place, or a grant, for ever.
MAX_PIPELINED_BEHIND_WAIT = 0x4000
#: TCP keepalive on every connection: a waiter whose machine died or was cut
#: off (no FIN, no RST) is noticed after KEEPALIVE_IDLE + KEEPALIVE_COUNT *
#: KEEPALIVE_INTERVAL seconds (two minutes) and leaves the queue.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
#: Connections one client address may hold open: a cluster's hosts hold a
#: handful each; a NAT gateway of a large site a few hundred.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 1000
#: Descriptors kept free for everything that is not a client connection
#: (the state file, memcached connections, logs, a new admin connection):
#: past RLIMIT_NOFILE minus this, new connections are answered 503 at once.
DEFAULT_RESERVED_FDS = 64
#: After a refusal is written, the connection is cut outright if the peer
#: has not closed it by then: over TLS a clean close waits for the peer's
#: close_notify, which a hostile or naive client never sends.
REFUSAL_LINGER = 2.0

_STATUS_TEXT = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large",
                415: b"Unsupported Media Type", 431: b"Request Header Fields Too Large",
                503: b"Service Unavailable"}


def refusal(status: int, reason: str, as_json: bool = False) -> bytes:
    """A whole HTTP answer (INVALID, or ERROR for 503) that closes the connection."""
    word = "ERROR" if status == 503 else "INVALID"
    if as_json:
        body, kind = json.dumps({"result": word, "reason": reason}).encode(), b"application/json"
    else:
        body, kind = word.encode(), b"text/plain"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nX-Distributex-Reason: %s\r\n"
            b"Connection: close\r\n\r\n%s" % (status, _STATUS_TEXT[status], kind, len(body),
                                                reason.encode("ascii", "replace"), body))


class DistributexChannel(HTTPChannel):
    """An HTTP/1.1 connection with the limits of the module doc."""

    MAX_LENGTH = MAX_LINE_BYTES
    totalHeadersSize = MAX_HEAD_BYTES

    _head_timer: Optional[IDelayedCall] = None
    _head_began = 0.0
    _in_head = False
    _refused = False
    _body_bytes = 0
    _limits: Optional["ConnectionLimits"] = None
    _address: Optional[str] = None
    #: Plain lock requests go to lean.LeanRequest; off when the site writes
    #: twisted.web's access log, which needs twisted.web's Request.
    lean_path = lean.AVAILABLE
    _lean_timeout: Optional[float] = None  # the idle timeout, while a LeanRequest awaits its answer

    def connectionMade(self) -> None:
        super().connectionMade()
        _keepalive(self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_head_timer()
        if self._limits is not None:
            self._limits.closed(self._address)
            self._limits = None
        super().connectionLost(reason)

    # -- the head --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.lean_path and self.line_mode and not self._handlingRequest and not self._buffer and not self._in_head:
            head = lean.parse(data)
            if head is not None:
                self._serve_lean(lean.LeanRequest(self, head))
                return
        if self.line_mode and not self._in_head and data:
            self._in_head = True
            self._body_bytes = 0
            self._head_began = time.monotonic()
        super().dataReceived(data)
        if self._in_head and self._head_timer is None and not self._refused:
            # The head did not come whole in one read (it nearly always
            # does): from now on it has what is left of HEAD_DEADLINE.
            left = self._head_began + HEAD_DEADLINE - time.monotonic()
            self._head_timer = self.callLater(max(0.0, left), self._head_too_slow)
        # What the line parser kept is a line not yet ended by CRLF: an LF in
        # it is a bare LF, which twisted.web never takes for a line end, so
        # the request would wait for the idle timeout instead of an answer.
        if self.line_mode and b"\n" in self._buffer and not self._refused:
            self._refuse(400, "bare LF line ending: HTTP lines end with CRLF")

    def _serve_lean(self, request: lean.LeanRequest) -> None:
        """What twisted.web does with a request, for a LeanRequest: later
        bytes are buffered until lean_done, and the idle timeout is off
        while an answer is awaited (a /wait). Most answers are written
        before process returns: those never touch the timer but to reset it."""
        self.resetTimeout()
        self.requests.append(request)
        self._handlingRequest = True
        self.setRawMode()
        request.process(self.site.resource)  # type: ignore[attr-defined]  # set by Site.buildProtocol
        if self.requests and self.requests[0] is request and self.timeOut:
            self._lean_timeout = self.setTimeout(None)

    def lean_done(self, request: lean.LeanRequest) -> None:
        """HTTPChannel.requestDone for a LeanRequest, whose connection is
        persistent: go on with what the client sent meanwhile."""
        del self.requests[0]
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        self._handlingRequest = False
        if self._lean_timeout is not None:
            self.setTimeout(self._lean_timeout)
            self._lean_timeout = None
        data = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self.setLineMode(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        self._in_head = False
        request = self.requests[-1]
        kind = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0].lower()
        if kind.startswith(b"multipart/"):
            self._refuse(415, "multipart bodies are not accepted: send a form (application/x-www-form-urlencoded)")
            return
        if self.length is not None and self.length > MAX_BODY_BYTES:
            self._refuse(413, f"body longer than {MAX_BODY_BYTES} bytes")
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if (self._handlingRequest and self.requests and getattr(self.requests[-1], "long_poll", False)
                and sum(map(len, self._dataBuffer)) + len(data) > MAX_PIPELINED_BEHIND_WAIT):
            log.info("dropping a connection that pipelined more than {limit} bytes behind its /wait",
                     limit=MAX_PIPELINED_BEHIND_WAIT)
            self._dataBuffer = []
            self.transport.abortConnection()  # type: ignore[union-attr]  # a TCP or Unix transport
            return
        if not self._handlingRequest:
            # A body (chunked bodies announce no length): count it.
            self._body_bytes += len(data)
            if self._body_bytes > MAX_BODY_BYTES + MAX_LINE_BYTES:  # chunk framing aside
                self._refuse(413, f"body longer than {MAX_BODY_BYTES} bytes")
                return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, f"a request or header line longer than {MAX_LINE_BYTES} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
        else:
            self._refuse(400, "malformed request")

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._refuse(408, f"request head not complete within {HEAD_DEADLINE:g} s")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, reason: str) -> None:
        """Answer and close: what comes after a broken head cannot be trusted."""
        self._cancel_head_timer()
        self._refused = True
        self._in_head = False
        self.setRawMode()
        self.dataReceived = self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.transport.write(refusal(status, reason))  # type: ignore[union-attr]
        _close_after_refusal(self.transport, self.loseConnection, self.callLater)


def _close_after_refusal(transport: Any, lose: Any, call_later: Any) -> None:
    """Close cleanly (the refusal is delivered), cut it after REFUSAL_LINGER."""
    lose()
    call_later(REFUSAL_LINGER, lambda: transport.connected and transport.abortConnection())


def _keepalive(transport: Any) -> None:
    set_keepalive = getattr(transport, "setTcpKeepAlive", None)
    if set_keepalive is None:
        return  # not TCP (a Unix socket): the kernel reports a dead peer
    set_keepalive(True)
    sock = transport.getHandle()
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Refuse(Protocol):
    """Answers 503 and closes: the server is at a connection limit."""

    def __init__(self, reason: str, call_later: Any) -> None:
        self.reason = reason
        self.call_later = call_later

    def connectionMade(self) -> None:
        self.transport.write(refusal(503, self.reason))  # type: ignore[union-attr]
        _close_after_refusal(self.transport, self.transport.loseConnection,  # type: ignore[union-attr]
                             self.call_later)


class ConnectionLimits:
    """Open connections, in all and per client address, and their caps."""

    def __init__(self, per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                 reserved_fds: int = DEFAULT_RESERVED_FDS) -> None:
        self.per_client = per_client
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.total = max(1, soft - reserved_fds) if soft != resource.RLIM_INFINITY else 1 << 30
        self.open = 0
        self.refused = 0
        self.by_address: Dict[str, int] = {}

    def refusal(self, address: Optional[str], call_later: Any) -> Optional[Protocol]:
        """None to accept, else the protocol that refuses."""
        reason = None
        if self.open >= self.total:
            reason = "server at its connection limit"
        elif address is not None and self.by_address.get(address, 0) >= self.per_client:
            reason = f"more than {self.per_client} connections from {address}"
        if reason is None:
            return None
        self.refused += 1
        return _Refuse(reason, call_later)

    def opened(self, address: Optional[str]) -> None:
        self.open += 1
        if address is not None:
            self.by_address[address] = self.by_address.get(address, 0) + 1

    def closed(self, address: Optional[str]) -> None:
        self.open -= 1
        if address is not None:
            left = self.by_address[address] - 1
            if left:
                self.by_address[address] = left
            else:
                del self.by_address[address]
