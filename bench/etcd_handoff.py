#!/usr/bin/env python3
"""Cross-server handoff on etcd: bench/handoff.py --cross (holder on server
A, waiter on server B) with both servers on a 3-member etcd cluster that
this script starts on loopback (tests/etcdcluster.py, etcd's default
timing, data on tmpfs) and stops afterwards. Target: p99 < 10 ms.

    python bench/etcd_handoff.py                    # 2000 handoffs
    python bench/etcd_handoff.py --count 500 --same # both hosts on one server

Other arguments go to bench/handoff.py as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from etcdcluster import EtcdCluster  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    same = "--same" in args
    args = [a for a in args if a != "--same"]
    etcd = EtcdCluster(heartbeat_ms=100, election_ms=1000)
    try:
        config = os.path.join(etcd.dir, "etcd-bench.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"backend": "etcd", "etcd_endpoints": etcd.endpoints,
                            "namespace": f"handoff{os.getpid()}"}, f)
        print(f"etcd: {len(etcd.members)} members on loopback ({', '.join(etcd.endpoints)}), data on tmpfs",
              flush=True)
        command = [sys.executable, os.path.join(HERE, "handoff.py"), "--config", config] + \
            ([] if same else ["--cross", "--jitter", "0.001"]) + args
        return subprocess.run(command, timeout=900).returncode
    finally:
        etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
