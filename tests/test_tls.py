"""Contract section 6, TLS: ``--listen ssl:...`` serves HTTPS, and with
``tls_client_ca`` requires client certificates. Throwaway certificates."""

import json
import ssl
import urllib.error
import urllib.request

import pytest
from servers import DistributexServer, Tls, wait_until

pytestmark = pytest.mark.timeout(60)

POOLS = [{"name": "pool1", "expire": 300}]


def tls_server(tmp_path, pki, cert="server", **config):
    pair = getattr(pki, cert)
    return DistributexServer(dict(config, pools=POOLS), workdir=str(tmp_path),
                             tls=Tls(pair.cert, pair.key, pki.ca.pair.cert))


def context(pki, ca="ca", client=None):
    ctx = ssl.create_default_context(cafile=getattr(pki, ca).pair.cert)
    if client is not None:
        ctx.load_cert_chain(getattr(pki, client).cert, getattr(pki, client).key)
    return ctx


def get(server, path, ctx):
    with urllib.request.urlopen(f"https://127.0.0.1:{server.port}{path}", context=ctx, timeout=10) as r:
        return r.status, r.read()


@pytest.fixture
def https(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    yield server
    server.kill()


def test_the_lock_cycle_works_over_https(https, pki):
    ctx = context(pki)
    assert get(https, "/get/?pool=pool1&host=a", ctx) == (200, b"YES")
    assert get(https, "/get/?pool=pool1&host=b", ctx) == (200, b"NO")
    assert get(https, "/release/?pool=pool1&host=a", ctx) == (200, b"OK")
    assert get(https, "/wait/?pool=pool1&host=b&timeout=1", ctx) == (200, b"YES")
    _, body = get(https, "/status/?format=json", ctx)
    assert [h["host"] for h in json.loads(body)["pools"][0]["holders"]] == ["b"]


def test_a_client_that_trusts_another_ca_refuses_the_server(https, pki):
    with pytest.raises(urllib.error.URLError) as info:
        get(https, "/get/?pool=pool1&host=a", context(pki, ca="other"))
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


def test_an_expired_server_certificate_is_refused(tmp_path, pki):
    server = tls_server(tmp_path, pki, cert="expired")
    try:
        with pytest.raises(urllib.error.URLError) as info:
            get(server, "/health", context(pki))
        assert "expired" in str(info.value)
    finally:
        server.kill()


@pytest.fixture
def mutual(tmp_path, pki):
    server = tls_server(tmp_path, pki, tls_client_ca=pki.ca.pair.cert)
    yield server
    server.kill()


def test_a_client_certificate_signed_by_the_clients_ca_is_accepted(mutual, pki):
    assert get(mutual, "/get/?pool=pool1&host=a", context(pki, client="client")) == (200, b"YES")


def test_a_client_without_a_certificate_is_refused_when_they_are_required(mutual, pki):
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(mutual, "/get/?pool=pool1&host=a", context(pki))


def test_a_client_certificate_from_another_ca_is_refused(mutual, pki):
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(mutual, "/get/?pool=pool1&host=a", context(pki, client="stranger"))


def test_a_refusal_over_tls_ends_the_connection_even_if_the_client_never_closes(https, pki):
    # A clean TLS close waits for the peer's close_notify; a client that
    # never sends it must not keep the refused connection open.
    sock = https.connect()
    sock.sendall(b"GET /health HTTP/1.1\nHost: x\n\n")  # bare LF: refused at once
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    # The socket stays open on this side, its close_notify never answered.
    wait_until(lambda: https.metric("distributex_connections") == 1, timeout=5)  # the scrape only
    sock.close()
