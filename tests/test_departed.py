"""A client that is gone never keeps a place in the queue, or a grant: the
ways a connection can end without the server hearing of it at once."""

import socket
import subprocess

import pytest
from contract_helpers import assert_plain, get, queued, release, waiters
from servers import wait_until

pytestmark = pytest.mark.timeout(60)

POOL1 = [{"name": "pool1", "expire": 0}]


def test_a_waiter_that_pipelines_past_the_read_buffer_and_hangs_up_leaves_the_queue(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "holder")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /wait/?pool=pool1&host=ghost HTTP/1.1\r\nHost: x\r\n\r\n")
    queued(server, ["ghost"])
    # Past twisted.web's 16 KiB of buffered pipelining, a server that stops
    # reading the socket would never hear the hang-up.
    status = b"GET /status/ HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        sock.sendall(status * (64 * 1024 // len(status)))
    except OSError:
        pass  # the server may drop the connection while we still send
    sock.close()
    wait_until(lambda: waiters(server) == [], timeout=5, what="the ghost to leave the queue")
    release(server, "holder")
    assert_plain(get(server, "live"), 200, b"YES")


def test_a_wait_with_a_little_pipelined_behind_it_is_still_answered(start_server, backend):
    server = start_server(POOL1, backend=backend)
    get(server, "holder")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /wait/?pool=pool1&host=w HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /status/?pool=pool1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    queued(server, ["w"])
    release(server, "holder")
    data = b""
    while b"POOL" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200") and b"YES" in data


def test_every_connection_has_tcp_keepalive_so_a_vanished_host_is_noticed(start_server):
    server = start_server(POOL1)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /wait/?pool=pool1&host=w HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: waiters(server) == ["w"] or get(server, "x").body == b"NO", timeout=5)
    # ss shows the server side's keepalive timer: timer:(keepalive,...)
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{server.port} )"],
                         capture_output=True, text=True, check=True).stdout
    sock.close()
    assert "keepalive" in out, out
