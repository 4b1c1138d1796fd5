"""Pool states kept in this process: the default backend, and the fastest."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from distributex.backend.base import Backend, Operation
from distributex.config import PoolSpec
from distributex.pool import Pool, PoolState, Step


class InMemoryBackend(Backend):
    """One Pool per configured pool, changed in place on the reactor thread.

    Operations complete synchronously and answer plain values, so a release
    hands the slot to the next waiter in the same call. Each pool has one
    timer, set for its earliest lease deadline, so a hold ends on time with
    no request to notice it.
    """

    def __init__(self, pools: Dict[str, PoolSpec], reactor: IReactorTime) -> None:
        super().__init__(pools, reactor)
        self._pools = {name: Pool(spec) for name, spec in pools.items()}
        self._timers: Dict[str, IDelayedCall] = {}

    def _apply(self, name: str, operation: Operation, now: Optional[float] = None) -> Step:
        pool = self._pools[name]
        if now is None:
            now = self.reactor.seconds()
        step = operation(pool, now)
        # Here deadlines only move later (renewals, new grants at now +
        # expire), so a pending timer is due no later than the next deadline.
        # It may fire early; that tick then sets the next one.
        if name not in self._timers:
            self._schedule(name, pool, now)
        if step.events:
            self._dispatch(step)
        return step

    def _snapshot(self, name: str) -> Tuple[PoolSpec, PoolState, float]:
        pool = self._pools[name]
        now = self.reactor.seconds()
        self._apply(name, _tick, now)
        return (pool.spec, pool.state, now)

    def _schedule(self, name: str, pool: Pool, now: float) -> None:
        deadline = pool.next_deadline()
        if deadline is not None:
            self._timers[name] = self.reactor.callLater(max(0.0, deadline - now), self._expire, name, deadline)

    def _expire(self, name: str, deadline: float) -> None:
        del self._timers[name]  # fired: _timers holds pending timers only
        # now + (deadline - now) may land a rounding step short of deadline:
        # what was due at the deadline is due when its timer fires.
        self._apply(name, _tick, max(self.reactor.seconds(), deadline))

    def stopService(self) -> None:
        super().stopService()
        self._answer_waiters()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


def _tick(pool: Pool, now: float) -> Step:
    return pool.tick(now)
