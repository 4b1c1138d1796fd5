import uuid

import pytest

from servers import DistributexServer, Memcached

BACKENDS = ["inmemory", "memcache", "etcd"]


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


@pytest.fixture
def start_server(request, tmp_path):
    """Start real distributex servers: start_server(pools, backend=..., **config)."""
    started = []

    def start(pools, backend="inmemory", memcache=None, **config):
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
        server = DistributexServer(config, workdir=str(workdir))
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
