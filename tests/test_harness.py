"""The test harness itself: a process a test starts is that test's own,
also when another test's process took its port first."""

import socket

import pytest
import servers
from servers import DistributexServer, Memcached, PortTaken


@pytest.fixture
def taken_port(monkeypatch):
    """A port that another process listens on, handed out by the next free_port()."""
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    handed = [port]
    real = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: handed.pop() if handed else real())
    yield port
    other.close()


def test_a_server_whose_port_was_taken_starts_on_another(taken_port, tmp_path):
    server = DistributexServer({"pools": [{"name": "p"}]}, workdir=str(tmp_path))
    try:
        assert server.port != taken_port
        assert server.call("get", pool="p", host="h").body == b"YES"
    finally:
        server.kill()


def test_a_server_on_a_port_the_test_chose_and_was_taken_raises_port_taken(taken_port, tmp_path):
    with pytest.raises(PortTaken):
        DistributexServer({"pools": [{"name": "p"}]}, workdir=str(tmp_path), port=taken_port)


def test_a_memcached_whose_port_was_taken_starts_on_another(taken_port):
    memcached = Memcached()
    try:
        assert memcached.port != taken_port and memcached.proc.poll() is None
    finally:
        memcached.kill()
