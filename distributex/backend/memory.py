"""Pool states kept in this process: the default backend, and the fastest."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from distributex.backend.base import Backend, Operation
from distributex.backend.statefile import StateFile
from distributex.catalog import Catalog, PoolSpec
from distributex.pool import Pool, PoolState, Step


#: How far short of its deadline a timer that fired on time can find the
#: clock: float rounding of now + delay, far below any clock's resolution.
TIMER_ROUNDING = 1e-6


def monotonic_clock() -> Callable[[], float]:
    """The clock of in-process deadlines: CLOCK_BOOTTIME where there is one.

    Monotonic, so that a step of the wall clock neither ends a lease early
    nor stretches it; and, unlike CLOCK_MONOTONIC, it counts a suspend,
    during which the holders on other machines kept running.
    """
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


class InMemoryBackend(Backend):
    """One Pool per configured pool, changed in place on the reactor thread.

    Operations complete synchronously and answer plain values, so a release
    hands the slot to the next waiter in the same call. Each pool has one
    timer, set for its earliest lease deadline, so a hold ends on time with
    no request to notice it.

    Deadlines run on ``clock`` (default: :func:`monotonic_clock`); the
    reactor only schedules the timers. With a ``state_file`` every durable
    change is written to it before the operation answers (see
    distributex.backend.statefile), and the holds it keeps are back after a
    restart.
    """

    def __init__(self, pools: Catalog, reactor: IReactorTime,
                 clock: Optional[Callable[[], float]] = None, state_file: Optional[StateFile] = None,
                 wall: Callable[[], float] = time.time) -> None:
        super().__init__(pools, reactor)
        self.clock = clock if clock is not None else monotonic_clock()
        self.state_file = state_file
        self.wall = wall
        # Every named pool, and the pools made on demand that are in use.
        self._pools = {name: Pool(spec, None, wall) for name, spec in pools.items()}
        self._timers: Dict[str, IDelayedCall] = {}
        # Pools a reload removed that still have holders or waiters: they
        # are forgotten once idle, as pools made on demand are.
        self._draining: Set[str] = set()
        if state_file is not None:
            for name, state in state_file.load(pools.find).items():
                spec = pools.find(name)
                assert spec is not None  # load keeps only pools that exist
                if spec.pattern is None or state.holders:  # an idle pool on demand is forgotten
                    self._pools[name] = Pool(spec, state, wall)
            state_file.open(self._specs(), self._states())

    def active_pools(self) -> List[str]:
        return list(self._pools)

    def draining(self, pool: str) -> Optional[PoolSpec]:
        return self._pools[pool].spec if pool in self._draining else None

    def reconfigure(self, pools: Catalog) -> None:
        super().reconfigure(pools)
        for name, pool in list(self._pools.items()):
            spec = pools.find(name)
            if spec is not None:
                pool.spec = spec
                self._draining.discard(name)
            elif pool.idle():
                self._forget(name)
            else:
                self._draining.add(name)
        for name, spec in pools.items():
            if name not in self._pools:
                self._pools[name] = Pool(spec, None, self.wall)

    def startService(self) -> None:
        super().startService()
        for name, pool in self._pools.items():
            if pool.state.holders:
                self._schedule(name, pool, self.clock())

    def _apply(self, name: str, operation: Operation, now: Optional[float] = None) -> Step:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = self._on_demand(name)
        if now is None:
            now = self.clock()
        step = operation(pool, now)
        # Here deadlines only move later (renewals, new grants at now +
        # expire), so a pending timer is due no later than the next deadline.
        # It may fire early; that tick then sets the next one.
        if name not in self._timers:
            self._schedule(name, pool, now)
        if step.events:
            if self.state_file is not None:
                # Before anyone is told: a grant answered is a grant kept.
                self.state_file.record(pool.spec, step.events, pool.state)
                if self.state_file.needs_compaction():
                    self.state_file.compact(self._specs(), self._states())
            self._dispatch(step)
        if (pool.spec.pattern is not None or name in self._draining) and pool.idle():
            self._forget(name)
        return step

    def _on_demand(self, name: str) -> Pool:
        spec = self.pools.find(name)
        if spec is None:
            raise KeyError(name)  # the HTTP layer asks only for pools that exist
        return Pool(spec, None, self.wall)

    def _forget(self, name: str) -> None:
        """Drop an idle pool made on demand: memory stays bounded by the pools
        in use, whatever names come and go. Its next token floors at the
        clock again (distributex.token)."""
        del self._pools[name]
        self._draining.discard(name)
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _states(self) -> Dict[str, PoolState]:
        return {name: pool.state for name, pool in self._pools.items()}

    def _specs(self) -> Dict[str, PoolSpec]:
        return {name: pool.spec for name, pool in self._pools.items()}

    def _snapshot(self, name: str) -> Tuple[PoolSpec, PoolState, float]:
        now = self.clock()
        if name in self._pools:
            self._apply(name, _tick, now)
        pool = self._pools.get(name)  # the tick may have forgotten an idle one
        if pool is None:
            return (self._on_demand(name).spec, PoolState(), now)
        return (pool.spec, pool.state, now)

    def _schedule(self, name: str, pool: Pool, now: float) -> None:
        deadline = pool.next_deadline()
        if deadline is not None:
            self._timers[name] = self.reactor.callLater(max(0.0, deadline - now), self._expire, name, deadline)

    def _expire(self, name: str, deadline: float) -> None:
        del self._timers[name]  # fired: _timers holds pending timers only
        # The reactor's timers run on the wall clock, ours on a monotonic
        # one: a timer that fires early (the wall clock jumped ahead) finds
        # nothing due and sets the next. One that fires on time may land a
        # rounding step short of its deadline: what was due then is due now.
        now = self.clock()
        if 0 < deadline - now < TIMER_ROUNDING:
            now = deadline
        self._apply(name, _tick, now)

    def stopService(self) -> None:
        super().stopService()
        self._answer_waiters()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self.state_file is not None:
            self.state_file.close()


def _tick(pool: Pool, now: float) -> Step:
    return pool.tick(now)
