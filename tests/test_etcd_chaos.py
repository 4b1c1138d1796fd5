"""Thirty real wrapped clients over three distributex servers sharing a
3-member etcd cluster, while etcd members are killed with kill -9: no two
commands ever overlap, tokens strictly increase, every client finishes."""

from __future__ import annotations

import time

import pytest

from etcdcluster import EtcdCluster, available
from servers import wait_until
from test_cluster import CLIENTS, EXPIRE, critical_sections, finish, start_clients

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not available(), reason="etcd is not installed (apt-get install etcd-server)")]


@pytest.fixture
def etcd3():
    etcd = EtcdCluster()
    yield etcd
    etcd.stop()


def servers_on(start_server, etcd, n=3):
    namespace = f"chaos{time.monotonic_ns()}"
    return [start_server([{"name": "p", "expire": EXPIRE}], backend="etcd", etcd_endpoints=etcd.endpoints,
                         namespace=namespace) for _ in range(n)]


def test_killing_the_etcd_leader_then_a_follower_mid_run_never_overlaps(start_server, etcd3, tmp_path):
    servers = servers_on(start_server, etcd3)
    log_path = tmp_path / "sections"
    procs = start_clients(servers, log_path)
    started_at_kills = []
    wait_until(lambda: sections_started(log_path) >= 5, timeout=60)
    leader = etcd3.leader()
    started_at_kills.append(sections_started(log_path))
    etcd3.kill(leader)
    time.sleep(0.5)
    etcd3.start(leader)
    etcd3.wait_healthy()
    wait_until(lambda: sections_started(log_path) >= started_at_kills[0] + 5, timeout=60)
    follower = etcd3.followers()[0]
    started_at_kills.append(sections_started(log_path))
    etcd3.kill(follower)
    time.sleep(0.5)
    etcd3.start(follower)
    codes = finish(procs)
    assert all(n < CLIENTS for n in started_at_kills), f"the kills came after the run: {started_at_kills}"
    tokens = critical_sections(log_path)
    assert codes == [0] * CLIENTS, codes
    assert len(tokens) == CLIENTS


def sections_started(log_path):
    try:
        with open(log_path) as f:
            return sum(1 for line in f if line.startswith("start"))
    except FileNotFoundError:
        return 0
