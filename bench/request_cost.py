#!/usr/bin/env python3
"""CPU time per HTTP request, distributex against a bare twisted.web resource,
in one process with no network: a steadier figure than throughput.py on a
shared or virtual machine, where the kernel and the neighbours move every
rate by 15 % or more from one run to the next.

Both resources sit behind a real twisted.web Site and HTTPChannel; the
requests arrive through an in-memory transport (twisted.internet.testing's
StringTransport), as keep-alive HTTP/1.1, in interleaved rounds. distributex
runs its real resource, in-memory backend (with its state file, and without),
event log, event hub and metrics (the log lines go
to a file observer writing to /dev/null, as twistd's would to its log; the
event log's clock advances as if ``--rate`` requests arrived per second, so
it writes as often as it would under that load).
The figure is what the server spends per request above the socket calls,
which throughput.py shows to be the same for both (5 system calls).

    python bench/request_cost.py [--requests 20000] [--rounds 5] [--rate 10000]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, textFileLogObserver

from distributex.backend.memory import InMemoryBackend, monotonic_clock
from distributex.backend.statefile import StateFile
from distributex.catalog import Catalog, PoolSpec
from distributex.eventlog import EventLog
from distributex.events import EventHub
from distributex.metrics import PoolMetrics
from distributex.web import DistributexResource, DistributexSite

from baseline_server import QuietSite, Yes  # the throughput baseline's site and resource

CLIENTS = 32


def channel(site):
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def run(site, clock, requests: list, n: int, rate: float = 10000) -> float:
    """Seconds of CPU for n requests, cycling over ``requests`` on 32 keep-alive channels.

    ``clock`` (the event log's) moves on by 32 requests' time at ``rate``
    requests/s after every 32 requests, a "reactor turn" under load.
    """
    channels = [channel(site) for _ in range(CLIENTS)]
    gc.collect()
    start = time.process_time()
    for i in range(n):
        proto, transport = channels[i % CLIENTS]
        proto.dataReceived(requests[i % len(requests)])
        transport.clear()
        if clock is not None and i % CLIENTS == CLIENTS - 1:
            clock.advance(CLIENTS / rate)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=10000,
                        help="requests/s the event log's clock assumes (default: this machine's rate)")
    args = parser.parse_args()

    # Pool events are logged as twistd logs them: formatted, written to a file.
    # (Beginning to log, as twistd does, also ends the start-up buffer that
    # would otherwise keep every log event.)
    devnull = open("/dev/null", "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(devnull)], redirectStandardIO=False)

    pools = Catalog({f"p{i}": PoolSpec(f"p{i}", expire=300) for i in range(CLIENTS)})
    clock = Clock()

    def server(state_file: bool) -> DistributexSite:
        """The server's real parts: backend (with or without its state file),
        event log, event hub and metrics as observers, resource and site."""
        journal = None
        if state_file:
            path = os.path.join(tempfile.mkdtemp(prefix="dx-cost-"), "distributex.state")
            journal = StateFile(path, monotonic_clock(), time.time)
        backend = InMemoryBackend(pools, reactor, state_file=journal)
        metrics = PoolMetrics(pools.find)
        for observer in (EventLog(clock).record, EventHub(clock).record, metrics.record):
            backend.observers.append(observer)
        return DistributexSite(DistributexResource(backend, pools, reactor))

    sites = {"off": server(False), "on": server(True)}
    base_site = QuietSite(Yes())

    def request(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    # Each client its own pool and host: every get a grant, every release a release.
    dx_requests = []
    for i in range(CLIENTS):
        dx_requests.append(request(f"/get/?pool=p{i}&host=client{i}"))
        dx_requests.append(request(f"/release/?pool=p{i}&host=client{i}"))
    # Interleave so that client i's get is followed by its release.
    dx_requests = [dx_requests[2 * (j % CLIENTS) + (j // CLIENTS) % 2] for j in range(2 * CLIENTS)]
    base_requests = [request(f"/get/?pool=p{i}&host=client{i}") for i in range(CLIENTS)]

    n = args.requests
    run(base_site, None, base_requests, n // 10)  # warm up all
    for site in sites.values():
        run(site, clock, dx_requests, n // 10, args.rate)
    base: list = []
    dx: dict = {mode: [] for mode in sites}
    for _ in range(args.rounds):
        base.append(run(base_site, None, base_requests, n) / n * 1e6)
        for mode, site in sites.items():
            dx[mode].append(run(site, clock, dx_requests, n, args.rate) / n * 1e6)
    b = statistics.median(base)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {args.rounds} rounds of {n} requests, "
          f"32 keep-alive channels, in-memory transport")
    print(f"bare twisted.web resource:                 {b:6.1f} us of CPU per request (rounds: "
          f"{', '.join(f'{x:.1f}' for x in base)})")
    for mode, costs in dx.items():
        d = statistics.median(costs)
        print(f"distributex get/release, state file {mode + ':':<4}  {d:6.1f} us of CPU per request (rounds: "
              f"{', '.join(f'{x:.1f}' for x in costs)}); adds {d - b:.1f} us: {100 * b / d:.1f}% of the "
              f"baseline's rate")


if __name__ == "__main__":
    main()
