"""What the HTTP tests share: raw requests that stay open, and the short calls."""

import socket
import ssl
import time
import urllib.parse

from servers import Answer, wait_until

class RawRequest:
    """One HTTP request on its own socket, answered whenever the server likes.

    A /wait/ stays open until its grant; this lets a test hold many open,
    check that one is still unanswered, or hang up on it.
    """

    def __init__(self, server, path, method="GET", query=None, **params):
        if query is None:
            query = urllib.parse.urlencode(params)
        self.sock = server.connect()
        self.sock.sendall(f"{method} /{path}/?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          "Connection: close\r\n\r\n".encode())
        self.data = b""
        self.closed = False

    def _read(self, timeout):
        """Read what arrives within `timeout` (a TLS socket cannot peek)."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):  # socket.timeout: Python 3.9
            return False
        if chunk:
            self.data += chunk
        else:
            self.closed = True
        return True

    def answered(self, within=0.0):
        """True if the server answered (or closed) within `within` seconds."""
        return bool(self.data) or self.closed or self._read(within if within > 0 else 0.001)

    def answer(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"no answer within {timeout}s")
        self.sock.close()
        return parse_response(self.data)

    def hang_up(self):
        self.sock.close()


def parse_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, body, headers)


def wait_for(server, pool="pool1", **params):
    return RawRequest(server, "wait", pool=pool, **params)


def holders(server, pool="pool1"):
    return [h["host"] for h in server.status(pool)["holders"]]


def waiters(server, pool="pool1"):
    return [w["host"] for w in server.status(pool)["waiters"]]


def queued(server, hosts, pool="pool1"):
    """Wait until the pool's queue is exactly `hosts`, in that order."""
    wait_until(lambda: waiters(server, pool) == list(hosts))


def get(server, host, pool="pool1", **params):
    return server.call("get", pool=pool, host=host, **params)


def release(server, host, pool="pool1", **params):
    return server.call("release", pool=pool, host=host, **params)


def assert_plain(answer, status, body):
    assert (answer.status, answer.body) == (status, body)
    assert answer.headers["content-type"] == "text/plain"
