import signal
import uuid

import pytest

from servers import DistributexServer, Memcached, Tls

BACKENDS = ["inmemory", "memcache", "etcd"]

# A suite started as a shell's background job (``./run-tests &``) inherits
# SIGINT ignored, and so would every client it starts: the client then keeps
# ignoring it, as a background job should, and the tests that stop a client
# with SIGINT fail. The tests start their clients as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def memcached():
    """One real memcached for the session; tests that kill it use their own."""
    server = Memcached()
    yield server
    server.kill()


@pytest.fixture
def own_memcached():
    """A memcached this test may kill and restart."""
    server = Memcached()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Throwaway CAs and certificates (tests/tlscerts.py)."""
    from tlscerts import Pki

    return Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def start_server(request, tmp_path):
    """Start real distributex servers: start_server(pools, backend=..., **config).

    A backend named with "+https" (say "inmemory+https") is that backend
    served over HTTPS with a certificate of the test CA."""
    started = []

    def start(pools, backend="inmemory", memcache=None, **config):
        backend, _, transport = backend.partition("+")
        tls = None
        if transport == "https":
            pki = request.getfixturevalue("pki")
            tls = Tls(pki.server.cert, pki.server.key, pki.ca.pair.cert)
        config = dict(config, pools=pools, backend=backend)
        if backend == "memcache":
            mc = memcache or request.getfixturevalue("memcached")
            config.setdefault("memcache_servers", [mc.address])
            # A namespace per test keeps tests sharing one memcached apart.
            config.setdefault("namespace", f"t{uuid.uuid4().hex}")
        elif backend == "etcd":
            config.setdefault("etcd_endpoints", request.getfixturevalue("etcd_cluster").endpoints)
            config.setdefault("namespace", f"t{uuid.uuid4().hex}")
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        server = DistributexServer(config, workdir=str(workdir), tls=tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Parametrizes a test over both backends."""
    return request.param


@pytest.fixture(scope="session")
def etcd_cluster():
    """One real 3-member etcd cluster for the session (tests/etcdcluster.py);
    tests that kill members start their own."""
    from etcdcluster import EtcdCluster

    cluster = EtcdCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def tls_etcd():
    """One etcd member served over TLS (its CA, certificate and key: ``.tls``)."""
    from etcdcluster import EtcdCluster

    etcd = EtcdCluster(size=1, tls=True)
    yield etcd
    etcd.stop()


@pytest.fixture
def etcd_backends(etcd_cluster):
    """In-process etcd backends on the session's cluster, sharing one pool
    "p": etcd_backends(count, expire). Stopped after the test."""
    from twisted.internet import reactor

    from clientfixtures import wait_for
    from distributex.backend.etcd import EtcdBackend
    from distributex.config import parse_config

    started = []

    def start(count=2, expire=30.0):
        config = parse_config(
            f"backend: etcd\netcd_endpoints: {list(etcd_cluster.endpoints)}\nnamespace: t{uuid.uuid4().hex}\n"
            f"pools:\n  - name: p\n    expire: {expire}\n")
        backends = [EtcdBackend(config, reactor) for _ in range(count)]
        for backend in backends:
            backend.startService()
        started.extend(backends)
        return backends

    yield start
    for backend in started:
        wait_for(backend.stopService())
