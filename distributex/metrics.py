"""``GET /metrics``: Prometheus metrics of the pools, through prometheus_client.

What is counted on the request path is counted in plain dictionaries on
the reactor thread (an increment costs a tenth of a microsecond, a labelled
prometheus_client child with its lock ten times more), histograms too; a
collector turns them into prometheus_client metric families at scrape time, and the exposition is generated
in a worker thread, so a scrape of many pools never stalls the reactor
(the collector copies each dictionary at once, which the GIL makes atomic).

Pools made on demand are counted under their pattern (``pool="job-*"``):
a stream of distinct names must not make a stream of time series.

The metrics (all prefixed ``distributex_``):

- ``pool_events_total{pool, kind}``: queued, granted, renewed, released,
  expired, left, reset, blocked;
- ``wait_seconds{pool}``: histogram of the time from a request to its
  grant (0 for a grant at once);
- ``hold_seconds{pool}``: histogram of the time from a grant to its end
  (release, expiry or reset);
- ``holders{pool}``, ``waiters{pool}``: gauges, now;
- ``oldest_hold_seconds{pool}``: gauge, the age of the oldest hold (a stuck job);
- ``lock_delay_seconds{pool}``: gauge, the time left of a lock-delay;
- ``backend_errors_total``: requests answered ERROR (the store was out of reach);
- ``connections``: client connections open now; ``connections_refused_total``:
  connections answered 503 at once, at a connection limit (contract section 6);
- ``process_*``: CPU, memory, file descriptors (prometheus_client's own).

On a shared backend, a server counts what it saw: the events it applied,
and the holders and waiters of the pools it last read.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from distributex.catalog import PoolSpec
from distributex.channel import ConnectionLimits
from distributex.pool import EXPIRED, GRANTED, LEFT, QUEUED, RELEASED, RENEWED, RESET, Event

#: Wait times span a handoff (microseconds) to a cron job queued for hours.
WAIT_BUCKETS = (0.001, 0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, float("inf"))
#: Hold times: a quick critical section to a night-long backup.
HOLD_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))


class PoolMetrics:
    """Observes the backend (``record``) and serves the exposition (``exposition``)."""

    def __init__(self, find: Callable[[str], Optional[PoolSpec]],
                 lock_delays: Callable[[], Dict[str, float]] = dict,
                 clock: Callable[[], float] = time.monotonic,
                 connections: Optional[ConnectionLimits] = None) -> None:
        self.find = find
        self.connections = connections if connections is not None else ConnectionLimits()
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.events: Dict[Tuple[str, str], int] = {}
        self.holders: Dict[str, int] = {}
        self.waiters: Dict[str, int] = {}
        self.backend_errors = 0
        self._queued: Dict[str, float] = {}  # ticket -> when it queued
        self._granted: Dict[Tuple[str, str, str, int], float] = {}  # (pool, host, session, token) -> when
        self._labels: Dict[str, str] = {}  # pool -> its label (cached: find() is not free)
        # pool label -> [bucket counts..., sum]: histograms kept by hand for
        # the same reason as the counters; exported as HistogramMetricFamily.
        self.wait_seconds: Dict[str, List[float]] = {}
        self.hold_seconds: Dict[str, List[float]] = {}
        self.registry.register(_Families(self, lock_delays))

    def label(self, pool: str) -> str:
        label = self._labels.get(pool)
        if label is None:
            spec = self.find(pool)
            label = spec.pattern if spec is not None and spec.pattern is not None else pool
            if len(self._labels) > 100_000:
                self._labels.clear()  # bounded: names on demand come and go
            self._labels[pool] = label
        return label

    def count_backend_error(self) -> None:
        self.backend_errors += 1

    def forget_labels(self) -> None:
        """After a reload, patterns and names may mean other pools."""
        self._labels.clear()

    def record(self, event: Event) -> None:
        kind = event.kind
        label = self.label(event.pool)
        key = (label, kind)
        self.events[key] = self.events.get(key, 0) + 1
        ticket = event.ticket
        if kind is QUEUED:
            self.waiters[label] = self.waiters.get(label, 0) + 1
            if ticket is not None:
                self._queued[ticket] = self.clock()
        elif kind is GRANTED:
            now = self.clock()
            queued = self._queued.pop(ticket, None) if ticket is not None else None
            if queued is not None:
                self.waiters[label] -= 1
            _observe(self.wait_seconds, label, WAIT_BUCKETS, 0.0 if queued is None else now - queued)
            self.holders[label] = self.holders.get(label, 0) + 1
            assert event.token is not None
            self._granted[(event.pool, event.host, event.session, event.token)] = now
        elif kind is RELEASED or kind is EXPIRED or (kind is RESET and event.token is not None):
            self.holders[label] = self.holders.get(label, 0) - 1
            granted = self._granted.pop((event.pool, event.host, event.session, event.token or 0), None)
            if granted is not None:
                _observe(self.hold_seconds, label, HOLD_BUCKETS, self.clock() - granted)
        elif kind is LEFT or kind is RESET or kind is RENEWED:
            if ticket is not None and self._queued.pop(ticket, None) is not None:
                self.waiters[label] -= 1

    def exposition(self) -> bytes:
        """The text exposition; safe to call from a worker thread."""
        return bytes(generate_latest(self.registry))


def _observe(histogram: Dict[str, List[float]], label: str, buckets: Tuple[float, ...], value: float) -> None:
    counts = histogram.get(label)
    if counts is None:
        counts = histogram[label] = [0.0] * (len(buckets) + 1)
    counts[bisect_left(buckets, value)] += 1  # the first bucket whose bound is >= value
    counts[-1] += value


def _histogram(name: str, help_text: str, histogram: Dict[str, List[float]],
               buckets: Tuple[float, ...]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=["pool"])
    for label, counts in list(histogram.items()):
        counts = list(counts)  # one copy: the reactor thread goes on counting
        cumulative, total = [], 0.0
        for bound, count in zip(buckets, counts):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        family.add_metric([label], cumulative, sum_value=counts[-1])
    return family


class _Families(Collector):
    """The dictionaries of PoolMetrics as metric families, at scrape time."""

    def __init__(self, metrics: PoolMetrics, lock_delays: Callable[[], Dict[str, float]]) -> None:
        self.metrics = metrics
        self.lock_delays = lock_delays

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        events = CounterMetricFamily("distributex_pool_events", "Pool events by pool and kind",
                                     labels=["pool", "kind"])
        for (pool, kind), count in dict(m.events).items():  # dict(): one atomic copy
            events.add_metric([pool, kind], count)
        yield events
        holders = GaugeMetricFamily("distributex_holders", "Holders now, by pool", labels=["pool"])
        for pool, count in dict(m.holders).items():
            holders.add_metric([pool], max(count, 0))
        yield holders
        waiters = GaugeMetricFamily("distributex_waiters", "Queued requests now, by pool", labels=["pool"])
        for pool, count in dict(m.waiters).items():
            waiters.add_metric([pool], max(count, 0))
        yield waiters
        oldest = GaugeMetricFamily("distributex_oldest_hold_seconds",
                                   "Age of the oldest hold now, by pool (0 when free)", labels=["pool"])
        now = m.clock()
        ages: Dict[str, float] = {label: 0.0 for label in dict(m.holders)}
        labels = dict(m._labels)  # record() put every granted pool's label there
        for (pool, _host, _session, _token), granted in dict(m._granted).items():
            label = labels.get(pool, pool)
            ages[label] = max(ages.get(label, 0.0), now - granted)
        for label, age in ages.items():
            oldest.add_metric([label], round(age, 3))
        yield oldest
        delays = GaugeMetricFamily("distributex_lock_delay_seconds",
                                   "Seconds left of a lock-delay (no grant until it ends), by pool",
                                   labels=["pool"])
        for pool, seconds in self.lock_delays().items():
            delays.add_metric([pool], seconds)
        yield delays
        yield _histogram("distributex_wait_seconds", "Time from a request to its grant", m.wait_seconds,
                         WAIT_BUCKETS)
        yield _histogram("distributex_hold_seconds", "Time from a grant to its end", m.hold_seconds,
                         HOLD_BUCKETS)
        errors = CounterMetricFamily("distributex_backend_errors",
                                     "Requests answered ERROR because the backend was out of reach")
        errors.add_metric([], m.backend_errors)
        yield errors
        opened = GaugeMetricFamily("distributex_connections", "Client connections open now")
        opened.add_metric([], m.connections.open)
        yield opened
        refused = CounterMetricFamily("distributex_connections_refused",
                                      "Connections answered 503 at once, at a connection limit")
        refused.add_metric([], m.connections.refused)
        yield refused

