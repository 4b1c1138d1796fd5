"""A small blocking HTTP/1.1 client for the few tiny requests of a lock.

Why not :mod:`http.client`: importing it, with the :mod:`email` package it
pulls in, costs about 30 ms on the machines we measured, half of the
wrapper's start-up budget, while a distributex answer is a status line, a
few headers and a body of two or three bytes. This module speaks just that:
one GET per connection (``Connection: close``), an answer framed by
``Content-Length``, chunks, or the end of the connection.
"""

from __future__ import annotations

import socket

from distributex import __version__
from distributex.client.errors import ProtocolError, ServerUnreachable, TLSFailure
from distributex.client.plans import REQUEST_TIMEOUT
from distributex.client.protocol import Answer

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    import ssl

    from distributex.client.address import ServerAddress
    from distributex.client.protocol import Request

USER_AGENT = f"distributex-client/{__version__}"

# Every distributex answer is a few hundred bytes; anything this large is not
# from distributex, and reading it all would only waste memory.
MAX_ANSWER = 64 * 1024

# A /wait/ may stay open for hours with nothing on the wire. TCP keepalive
# notices a server host that vanished without closing (power loss, network
# partition) after about idle + interval * count = 90 s, instead of never.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


def fetch(address: ServerAddress, request: Request, secret: str | None = None,
          ssl_context: ssl.SSLContext | None = None) -> Answer:
    """Send ``request`` to the server at ``address`` and return its answer.

    Raises :class:`ServerUnreachable` when the server cannot be reached or
    does not answer within ``request.timeout``, :class:`ProtocolError` when
    what comes back is not HTTP, :class:`TLSFailure` when the TLS handshake
    fails (a certificate that does not verify, or a missing client one).
    ``secret`` goes as ``Authorization: Bearer``; ``ssl_context`` verifies
    an https server (default: the system's certificate store).
    """
    authorization = f"Authorization: Bearer {secret}\r\n" if secret else ""
    head = (f"GET {request.target(address.prefix)} HTTP/1.1\r\n"
            f"Host: {address.netloc}\r\n"
            f"Accept: text/plain\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            f"{authorization}"
            f"Connection: close\r\n\r\n")
    connect_timeout = REQUEST_TIMEOUT if request.timeout is None else min(
        REQUEST_TIMEOUT, request.timeout)
    try:
        sock = _connect(address, connect_timeout)
    except OSError as error:
        raise ServerUnreachable(f"cannot reach {address.url}: {_describe(error)}") from None
    try:
        if address.scheme != "unix":
            _keep_alive(sock)
        if address.scheme == "https":
            sock = _tls(sock, address.host, ssl_context, address.url)
        sock.settimeout(request.timeout)
        sock.sendall(head.encode("ascii"))
        return _read_answer(sock)
    except OSError as error:
        _raise_tls_alert(address, error)
        raise ServerUnreachable(f"no answer from {address.url}: {_describe(error)}",
                                connected=True) from None
    finally:
        sock.close()


def _connect(address: ServerAddress, timeout: float) -> socket.socket:
    if address.scheme != "unix":
        return socket.create_connection((address.host, address.port), timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address.host)
    except BaseException:
        sock.close()
        raise
    return sock


def _raise_tls_alert(address: ServerAddress, error: OSError) -> None:
    # With TLS 1.3 the server refuses a client certificate (or the lack of
    # one) after the handshake, as an alert on the first read.
    if address.scheme == "https":
        import ssl

        if isinstance(error, ssl.SSLError) and "ALERT" in str(error.reason or ""):
            raise TLSFailure(f"TLS with {address.url} failed: the server refused "
                             f"this client ({error.reason})") from None


def _describe(error: OSError) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return error.strerror or str(error) or type(error).__name__


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        option = getattr(socket, name, None)  # not every platform has them
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _tls(sock: socket.socket, hostname: str, context: ssl.SSLContext | None,
         url: str) -> socket.socket:
    import ssl  # only https users pay for it

    if context is None:
        context = ssl.create_default_context()
    try:
        return context.wrap_socket(sock, server_hostname=hostname)
    except ssl.SSLCertVerificationError as error:
        raise TLSFailure(f"TLS with {url} failed: its certificate did not verify: "
                         f"{error.verify_message or error.reason}") from None
    except ssl.SSLError as error:
        raise TLSFailure(f"TLS with {url} failed: {error.reason or error}") from None


class _Reader:
    """Bytes from a socket, buffered, with a cap on the total."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.total = 0

    def fill(self) -> bool:
        """Read some more; False at the end of the connection."""
        data = self.sock.recv(4096)
        self.total += len(data)
        if self.total > MAX_ANSWER:
            raise ProtocolError(f"an answer larger than {MAX_ANSWER} bytes")
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes) -> bytes:
        """Everything up to ``marker``, which is consumed."""
        while marker not in self.buffer:
            if not self.fill():
                raise _closed()
        before, _, self.buffer = self.buffer.partition(marker)
        return before

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise _closed()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _closed() -> ConnectionError:
    # An OSError, so that fetch() reports it as a server gone away: the
    # server was stopped or crashed, and a retry may well succeed.
    return ConnectionError("the server closed the connection before answering")


def _read_answer(sock: socket.socket) -> Answer:
    reader = _Reader(sock)
    status_line, *header_lines = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP answer: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunks(reader)
    elif headers.get("content-length", "").isdigit():
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.rest()
    return Answer(int(parts[1]), body, headers)


def _read_chunks(reader: _Reader) -> bytes:
    body = b""
    while True:
        size_line = reader.until(b"\r\n").split(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ProtocolError(f"a malformed chunk size: {size_line[:20]!r}") from None
        if size == 0:
            return body  # trailers, if any, do not matter to us
        body += reader.exactly(size)
        reader.until(b"\r\n")
