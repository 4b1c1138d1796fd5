"""The etcd backend over TLS (with a client certificate) and with etcd's own
authentication (a user whose role may use only the namespace)."""

from __future__ import annotations

import base64

import pytest

from etcdcluster import EtcdCluster, TLSFiles, available

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)")]

POOL = [{"name": "p", "expire": 30}]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def auth_etcd():
    """One member with auth enabled: root, and user "dx" (password "dx-secret")
    allowed to read and write under "authns/" only."""
    etcd = EtcdCluster(size=1)
    for path, payload in [
        ("/v3/auth/user/add", {"name": "root", "password": "root-secret"}),
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/user/add", {"name": "dx", "password": "dx-secret"}),
        ("/v3/auth/role/add", {"name": "dx"}),
        ("/v3/auth/role/grant", {"name": "dx", "perm": {"permType": "READWRITE", "key": b64("authns/"),
                                                         "range_end": b64("authns0")}}),
        ("/v3/auth/user/grant", {"user": "dx", "role": "dx"}),
        ("/v3/auth/enable", {}),
    ]:
        etcd.post(path, payload)
    yield etcd
    etcd.stop()


def test_tls_to_etcd_with_a_client_certificate(start_server, tls_etcd):
    files = tls_etcd.tls
    a, b = [start_server(POOL, backend="etcd", etcd_endpoints=tls_etcd.endpoints, etcd_cacert=files.ca,
                         etcd_cert=files.cert, etcd_key=files.key, namespace="tls") for _ in range(2)]
    assert a.call("get", pool="p", host="h1").body == b"YES"
    assert b.call("get", pool="p", host="h2").body == b"NO"
    assert a.call("health").status == 200


def test_tls_to_etcd_with_an_unknown_ca_answers_error_503(start_server, tls_etcd, tmp_path):
    stranger = TLSFiles(str(tmp_path))  # a CA that etcd does not know
    server = start_server(POOL, backend="etcd", etcd_endpoints=tls_etcd.endpoints, etcd_cacert=stranger.ca,
                          etcd_cert=stranger.cert, etcd_key=stranger.key, namespace="tls")
    answer = server.call("get", pool="p", host="h1", http_timeout=30)
    assert (answer.status, answer.body) == (503, b"ERROR")


def test_etcd_authentication_with_a_user_and_a_password_file(start_server, auth_etcd, tmp_path):
    secret = tmp_path / "etcd.password"
    secret.write_text("dx-secret\n")
    secret.chmod(0o600)
    a, b = [start_server(POOL, backend="etcd", etcd_endpoints=auth_etcd.endpoints, namespace="authns",
                         etcd_user="dx", etcd_password_file=str(secret)) for _ in range(2)]
    assert a.call("get", pool="p", host="h1").body == b"YES"
    assert b.call("get", pool="p", host="h2").body == b"NO"
    assert a.call("release", pool="p", host="h1").body == b"OK"
    assert b.call("wait", pool="p", host="h2", http_timeout=10).body == b"YES"


def test_a_wrong_etcd_password_answers_error_503(start_server, auth_etcd, tmp_path):
    secret = tmp_path / "etcd.password"
    secret.write_text("not-the-password\n")
    secret.chmod(0o600)
    server = start_server(POOL, backend="etcd", etcd_endpoints=auth_etcd.endpoints, namespace="authns",
                          etcd_user="dx", etcd_password_file=str(secret))
    answer = server.call("get", pool="p", host="h1", http_timeout=30)
    assert (answer.status, answer.body) == (503, b"ERROR")
    assert "authentication failed" in answer.headers["x-distributex-reason"]
