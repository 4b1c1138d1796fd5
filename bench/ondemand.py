#!/usr/bin/env python3
"""Memory of pools on demand: 1,000,000 distinct names cycled through.

In one process, the server's real parts (in-memory backend with its state
file, event log, event hub, metrics) take and give back a pool of a new
name matching a ``pattern:`` entry, a million times. Idle pools on demand
are forgotten, so the resident memory must stop growing: the target is
that it grows by less than --max-growth MiB from the first 100,000 names
to the last (what a long-running server would see).

    python bench/ondemand.py [--names 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from common import print_header, rss_mib  # noqa: E402
from distributex.backend.memory import InMemoryBackend, monotonic_clock  # noqa: E402
from distributex.backend.statefile import StateFile  # noqa: E402
from distributex.catalog import Catalog, PoolPattern, PoolSpec  # noqa: E402
from distributex.eventlog import EventLog  # noqa: E402
from distributex.events import EventHub  # noqa: E402
from distributex.metrics import PoolMetrics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--max-growth", type=float, default=20.0, help="MiB, from 100,000 names to the end")
    args = parser.parse_args()
    if not 200_000 <= args.names <= 10_000_000:
        parser.error("--names 200000..10000000")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False)
    print_header("distributex: memory of pools on demand", [
        f"{args.names} distinct names matching 'job-*', each taken (/get) and given back (/release), in "
        f"process: in-memory backend with its state file, event log, event hub, metrics"])
    clock = Clock()
    catalog = Catalog({"fixed": PoolSpec("fixed")}, [PoolPattern("job-*", PoolSpec("job-*", expire=600))])
    journal = StateFile(os.path.join(tempfile.mkdtemp(prefix="dx-ondemand-"), "distributex.state"),
                        monotonic_clock(), time.time)
    backend = InMemoryBackend(catalog, clock, state_file=journal)
    metrics = PoolMetrics(catalog.find)
    for observer in (EventLog(clock).record, EventHub(clock).record, metrics.record):
        backend.observers.append(observer)
    pid = os.getpid()
    marks = {}
    started = time.monotonic()
    for n in range(args.names):
        name = f"job-{n}"
        backend.get(name, "h", "", "s")
        backend.release(name, "h", "s")
        if n % 1000 == 999:
            clock.advance(0.1)  # the event log writes, as a busy server's would
        if (n + 1) % 100_000 == 0:
            marks[n + 1] = rss_mib(pid)[0]
            print(f"  {n + 1:>9} names: RSS {marks[n + 1]:6.1f} MiB, pools in memory "
                  f"{len(backend.active_pools())}, {time.monotonic() - started:5.1f} s")
    growth = marks[args.names // 100_000 * 100_000] - marks[100_000]
    ok = growth < args.max_growth and backend.active_pools() == ["fixed"]
    print(f"  growth from 100,000 names to {args.names}: {growth:.1f} MiB; target < {args.max_growth:g} MiB: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
