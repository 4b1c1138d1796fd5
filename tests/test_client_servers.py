"""Contract section 7 against real servers: several servers (-H a,b,c), a
Unix socket, ERROR at the start retried, access secrets and TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from clientfixtures import (  # noqa: F401  (the fixture dx)
    CLIENT,
    LONG,
    Relay,
    assert_pool_free,
    dx_server,
    hosts,
    run_client,
    start_dx,
)
from servers import DistributexServer, Tls, free_port, wait_until
from tlscerts import Pki

from distributex.client import Locker
from distributex.client.errors import ServerError

pytestmark = pytest.mark.timeout(60)

ERROR_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 5\r\nConnection: close\r\n\r\nERROR")


def client(*args: str, env: Dict[str, str] | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    """The command with these arguments only (no -H of its own)."""
    return subprocess.run([sys.executable, CLIENT, *args], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else dict(os.environ, **env))


def dead() -> str:
    """A server that cannot be reached: nothing listens there."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def relay(dx: DistributexServer) -> Iterator[Relay]:
    relay = Relay(dx)
    yield relay
    relay.close()


# -- several servers -----------------------------------------------------------------

def test_the_next_server_is_tried_when_one_cannot_be_reached(dx, tmp_path):
    ran = tmp_path / "ran"
    result = client("-H", f"{dead()},127.0.0.1:{dx.port}", "-r", "api",
                    f"echo $DISTRIBUTEX_HOST > {ran}")
    assert (result.returncode, result.stderr) == (0, "")
    assert ran.exists()
    assert_pool_free(dx, "api")


def test_the_server_that_answered_is_kept_for_the_release(dx, relay):
    locker = Locker(f"{dead()},{relay.url[len('http://'):]}", host="h")
    with locker.lock("api"):
        assert locker.address.port == relay.port
    assert relay.paths() == ["/wait/", "/release/"]
    assert_pool_free(dx, "api")


def test_a_release_falls_over_to_the_next_server(dx, relay):
    locker = Locker(f"{relay.url},{dx.url}", host="h")
    held = locker.acquire("api")
    relay.close()  # the server that granted it goes away; its cluster peer is there
    assert hosts(dx, "api") == ["h"]
    held.release()
    assert locker.address.port == dx.port
    assert_pool_free(dx, "api")


def test_when_no_server_can_be_reached_it_says_so_in_one_line(tmp_path):
    result = client("-H", f"{dead()},{dead()}", "-E", "3", "-t", "0.5", "-r", "p",
                    f"touch {tmp_path / 'ran'}")
    assert result.returncode == 3
    assert result.stderr.startswith("distributex: cannot reach http://127.0.0.1:")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "ran").exists()


def test_h_given_twice_is_a_usage_error(dx):
    result = client("-H", "a", "-H", f"127.0.0.1:{dx.port}", "-r", "api", "true")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "-H given twice" in result.stderr


# -- a Unix socket ---------------------------------------------------------------

class UnixServer(DistributexServer):
    def __init__(self, path: str, workdir: str) -> None:
        self.path = path
        super().__init__({"pools": [{"name": "p", "expire": LONG}]}, workdir=workdir,
                         listen=f"unix:{path}")


@pytest.fixture
def unix_server(tmp_path: Any) -> Iterator[UnixServer]:
    server = UnixServer(str(tmp_path / "dx.sock"), str(tmp_path))
    yield server
    server.kill()


def test_a_server_on_a_unix_socket(unix_server, tmp_path):
    ran = tmp_path / "ran"
    result = client("-H", f"unix:{unix_server.path}", "-r", "p", f"touch {ran}")
    assert (result.returncode, result.stderr) == (0, "")
    assert ran.exists()
    locker = Locker(f"unix:{unix_server.path}", host="h")
    with locker.lock("p") as held:
        assert held.token > 0
    assert locker.lock("p", nowait=True).release() is None  # free again


def test_a_unix_socket_in_a_list_of_servers(unix_server, tmp_path):
    result = client("-H", f"unix:{tmp_path / 'nothing.sock'},unix:{unix_server.path}",
                    "-r", "p", "true")
    assert (result.returncode, result.stderr) == (0, "")


# -- ERROR at the start ----------------------------------------------------------

def test_error_at_the_start_is_retried_until_the_server_recovers(dx, relay):
    relay.answer = ERROR_ANSWER  # the backend's blip
    results: List[Any] = []
    thread = threading.Thread(target=lambda: results.append(
        Locker(relay.url, host="h").acquire("api", timeout=20)))
    thread.start()
    wait_until(lambda: len(relay.paths()) >= 2, what="a retry")
    relay.answer = None
    thread.join(30)
    held = results[0]
    assert hosts(dx, "api") == ["h"]
    held.release()
    assert_pool_free(dx, "api")


def test_error_until_the_timeout_is_given_up_on_when_it_passes(relay):
    relay.answer = ERROR_ANSWER
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"server error \(HTTP 503\).*\(tried \d+ times"):
        Locker(relay.url, host="h").acquire("api", timeout=1)
    assert 0.9 < time.monotonic() - started < 5
    assert len(relay.paths()) >= 3  # retried with backoff, not given up at once


# -- access secrets ----------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    directory = tmp_path_factory.mktemp("secured")
    files = {}
    for name, secret in (("cron", "s3cret-cron"), ("wrong", "guess")):
        path = directory / f"{name}.secret"
        path.write_text(secret + "\n")
        os.chmod(path, 0o600)
        files[name] = str(path)
    server = start_dx(str(directory), [{"name": "backup", "expire": LONG},
                                       {"name": "deploy", "expire": LONG}],
                      access=[{"name": "cron", "secret_file": files["cron"], "role": "client",
                               "pools": ["backup"]}])
    yield dict(files, server=server, where=f"127.0.0.1:{server.port}")
    server.kill()


def test_the_auth_file_s_secret_is_sent(secured, tmp_path):
    result = client("-H", secured["where"], "--auth-file", secured["cron"], "-r", "backup",
                    f"touch {tmp_path / 'ran'}")
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "ran").exists()


def test_the_auth_file_may_come_from_the_environment(secured):
    result = client("-H", secured["where"], "-r", "backup", "true",
                    env={"DISTRIBUTEX_AUTH_FILE": secured["cron"]})
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("secret, pool, status", [
    (None, "backup", 401), ("wrong", "backup", 401), ("cron", "deploy", 403),
])
def test_a_refused_secret_is_one_line_and_the_conflict_status(secured, tmp_path, secret,
                                                             pool, status):
    auth = ["--auth-file", secured[secret]] if secret else []
    result = client("-H", secured["where"], *auth, "-E", "3", "-r", pool,
                    f"touch {tmp_path / 'ran'}")
    assert result.returncode == 3
    assert result.stderr.startswith(f"distributex: server refused the request (HTTP {status})")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "ran").exists()


def test_an_unreadable_auth_file_is_a_usage_error(secured, tmp_path):
    result = client("-H", secured["where"], "--auth-file", str(tmp_path / "none"),
                    "-r", "backup", "true")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot read the auth file" in result.stderr


def test_the_locker_sends_its_secret(secured):
    locker = Locker(secured["where"], host="h", secret="s3cret-cron")
    with locker.lock("backup") as held:
        assert held.token > 0


def test_the_twisted_locker_sends_its_secret(secured):
    from clientfixtures import wait_for
    from twisted.internet import reactor

    from distributex.client.txlocker import TxLocker

    locker = TxLocker(f"http://{secured['where']}", reactor, host="h", secret="s3cret-cron")
    held = wait_for(locker.acquire("backup"))
    assert held.token > 0
    wait_for(held.release())


# -- TLS -------------------------------------------------------------------------------

def tls_server(directory: str, pki: Pki, cert: str = "server", **config: Any) -> DistributexServer:
    pair = getattr(pki, cert)
    return DistributexServer(dict(config, pools=[{"name": "p", "expire": LONG}]), workdir=directory,
                             tls=Tls(pair.cert, pair.key, pki.ca.pair.cert))


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, pki: Pki
          ) -> Iterator[DistributexServer]:
    server = tls_server(str(tmp_path_factory.mktemp("https")), pki)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory, pki: Pki
           ) -> Iterator[DistributexServer]:
    server = tls_server(str(tmp_path_factory.mktemp("mutual")), pki, tls_client_ca=pki.ca.pair.cert)
    yield server
    server.kill()


def test_an_https_server_verified_against_the_cacert(https, pki, tmp_path):
    result = client("-H", https.url, "--cacert", pki.ca.pair.cert, "-r", "p",
                    f"touch {tmp_path / 'ran'}")
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "ran").exists()


def assert_tls_refused(result: subprocess.CompletedProcess, tmp_path: Any, words: str) -> None:
    assert result.returncode == 3
    assert result.stderr.startswith("distributex: TLS with https://127.0.0.1:")
    assert words in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "ran").exists()


def test_a_server_of_another_ca_is_refused(https, pki, tmp_path):
    result = client("-H", https.url, "--cacert", pki.other.pair.cert, "-E", "3", "-r", "p",
                    f"touch {tmp_path / 'ran'}")
    assert_tls_refused(result, tmp_path, "certificate")


def test_an_expired_server_certificate_is_refused(pki, tmp_path):
    server = tls_server(str(tmp_path), pki, cert="expired")
    try:
        result = client("-H", server.url, "--cacert", pki.ca.pair.cert, "-E", "3", "-r", "p",
                        f"touch {tmp_path / 'ran'}")
    finally:
        server.kill()
    assert_tls_refused(result, tmp_path, "expired")


def test_a_client_certificate_is_presented(mutual, pki, tmp_path):
    result = client("-H", mutual.url, "--cacert", pki.ca.pair.cert,
                    "--cert", pki.client.cert, "--key", pki.client.key, "-r", "p",
                    f"touch {tmp_path / 'ran'}")
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "ran").exists()


def test_a_missing_client_certificate_is_refused(mutual, pki, tmp_path):
    result = client("-H", mutual.url, "--cacert", pki.ca.pair.cert, "-E", "3", "-r", "p",
                    f"touch {tmp_path / 'ran'}")
    assert_tls_refused(result, tmp_path, "refused this client")


def test_an_unreadable_cacert_is_a_usage_error(https, tmp_path):
    result = client("-H", https.url, "--cacert", str(tmp_path / "none.pem"), "-r", "p",
                    "true")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot load --cacert" in result.stderr


def test_the_locker_takes_an_ssl_context(mutual, pki):
    import ssl

    context = ssl.create_default_context(cafile=pki.ca.pair.cert)
    context.load_cert_chain(pki.client.cert, pki.client.key)
    with Locker(mutual.url, host="h", ssl_context=context).lock("p") as held:
        assert held.token > 0


def test_the_twisted_locker_verifies_and_presents_certificates(mutual, pki):
    from clientfixtures import wait_for
    from twisted.internet import reactor

    from distributex.client.txlocker import TxLocker

    locker = TxLocker(mutual.url, reactor, host="h", cacert=pki.ca.pair.cert,
                      cert=pki.client.cert, key=pki.client.key)
    held = wait_for(locker.acquire("p"))
    assert held.token > 0
    wait_for(held.release())


def test_the_twisted_locker_refuses_a_server_of_another_ca(https, pki):
    from clientfixtures import wait_for
    from twisted.internet import reactor

    from distributex.client.errors import TLSFailure
    from distributex.client.txlocker import TxLocker

    locker = TxLocker(https.url, reactor, host="h", cacert=pki.other.pair.cert)
    with pytest.raises(TLSFailure, match="TLS with https://127.0.0.1:"):
        wait_for(locker.acquire("p", timeout=5))


def test_the_twisted_locker_tries_the_next_server_and_keeps_it(dx, relay):
    from clientfixtures import wait_for
    from twisted.internet import reactor

    from distributex.client.txlocker import TxLocker

    locker = TxLocker(f"{dead()},{relay.url[len('http://'):]}", reactor, host="h")
    held = wait_for(locker.acquire("api"))
    assert locker.address.port == relay.port
    wait_for(held.release())
    assert relay.paths() == ["/wait/", "/release/"]
    assert_pool_free(dx, "api")


def test_the_twisted_locker_s_release_falls_over_to_the_next_server(dx, relay):
    from clientfixtures import wait_for
    from twisted.internet import reactor

    from distributex.client.txlocker import TxLocker

    locker = TxLocker(f"{relay.url},{dx.url}", reactor, host="h")
    held = wait_for(locker.acquire("api"))
    relay.close()
    wait_for(held.release())
    assert locker.address.port == dx.port
    assert_pool_free(dx, "api")
