"""Pool states kept in this process: the default backend, and the fastest."""

from __future__ import annotations

from typing import Dict, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from distributex.backend.base import Backend, Operation
from distributex.config import PoolSpec
from distributex.pool import Pool


class InMemoryBackend(Backend):
    """One Pool per configured pool, changed in place on the reactor thread.

    Operations complete synchronously (the Deferreds they return have
    already fired), so a release hands the slot to the next waiter in the
    same reactor turn. Each pool has one timer, set for its earliest lease
    deadline, so a hold ends on time with no request to notice it.
    """

    def __init__(self, pools: Dict[str, PoolSpec], reactor: IReactorTime) -> None:
        super().__init__(pools, reactor)
        self._pools = {name: Pool(spec) for name, spec in pools.items()}
        self._timers: Dict[str, IDelayedCall] = {}

    def _apply(self, name: str, operation: Operation, now: Optional[float] = None) -> Deferred:
        pool = self._pools[name]
        if now is None:
            now = self.reactor.seconds()
        step = operation(pool, now)
        self._schedule(name, pool, now)
        self._dispatch(step)
        return succeed(step)

    def _snapshot(self, name: str) -> Deferred:
        pool = self._pools[name]
        return self._tick(name).addCallback(lambda _: (pool.spec, pool.state, self.reactor.seconds()))

    def _schedule(self, name: str, pool: Pool, now: float) -> None:
        deadline = pool.next_deadline()
        if deadline is None:
            return
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            # A timer that fires early is harmless (the tick finds nothing
            # due and sets the next one); moving it on every renewal is not free.
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        self._timers[name] = self.reactor.callLater(max(0.0, deadline - now), self._expire, name, deadline)

    def _tick(self, name: str) -> Deferred:
        return self._apply(name, lambda pool, now: pool.tick(now))

    def _expire(self, name: str, deadline: float) -> None:
        # now + (deadline - now) may land a rounding step short of deadline:
        # what was due at the deadline is due when its timer fires.
        self._apply(name, lambda pool, now: pool.tick(now), max(self.reactor.seconds(), deadline))

    def stopService(self) -> None:
        super().stopService()
        self._answer_waiters()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
