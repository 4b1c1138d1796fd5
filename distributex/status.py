"""The /status/ report: who holds each pool and who waits, for people and programs."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from distributex.config import PoolSpec
from distributex.pool import PoolState

Snapshot = Tuple[PoolSpec, PoolState, float]


def lock_delay(state: PoolState, now: float, wall: float) -> Optional[Dict[str, Any]]:
    """The pool's lock-delay: when it ends (wall clock) and the seconds left; None without one."""
    remaining = state.blocked_until - now
    if remaining <= 0:
        return None
    return {"until": round(wall + remaining, 3), "remaining": round(remaining, 3)}


def status_json(pools: Sequence[Snapshot], wall: Callable[[], float] = time.time) -> Dict[str, Any]:
    out = []
    wall_now = wall()
    for spec, state, now in pools:
        out.append({
            "name": spec.name,
            "maxlocks": spec.maxlocks,
            "expire": spec.expire,
            "pattern": spec.pattern,
            "lock_delay": lock_delay(state, now, wall_now),
            "holders": [{
                "host": h.host,
                "session": h.session or None,
                "label": h.label,
                "token": h.token,
                "held_for": round(now - h.granted_at, 3),
                "expires_in": None if h.expires_at is None else round(max(0.0, h.expires_at - now), 3),
            } for h in sorted(state.holders.values(), key=lambda h: h.token)],
            "waiters": [{
                "position": i,
                "host": t.host,
                "session": t.session or None,
                "label": t.label,
                "waited_for": round(now - t.queued_at, 3),
            } for i, t in enumerate(state.queue.values(), 1)],
        })
    return {"pools": out}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def status_table(pools: Sequence[Snapshot], wall: Callable[[], float] = time.time) -> str:
    """A fixed-width table, one line per holder and waiter, one per idle pool;
    a pool in lock-delay says so, and until when."""
    rows: List[Tuple[str, ...]] = [("POOL", "SLOTS", "STATE", "HOST", "SESSION", "TOKEN", "FOR", "EXPIRES IN",
                                     "LABEL")]
    for spec, state, now in pools:
        slots = f"{len(state.holders)}/{spec.maxlocks}"
        first = True
        for h in sorted(state.holders.values(), key=lambda h: h.token):
            expires = "never" if h.expires_at is None else _duration(max(0.0, h.expires_at - now))
            rows.append((spec.name if first else "", slots if first else "", "held", h.host, h.session,
                         str(h.token), _duration(now - h.granted_at), expires, h.label))
            first = False
        for i, t in enumerate(state.queue.values(), 1):
            rows.append((spec.name if first else "", slots if first else "", f"wait {i}", t.host, t.session,
                         "", _duration(now - t.queued_at), "", t.label))
            first = False
        delay = lock_delay(state, now, wall())
        if delay is not None:
            until = time.strftime("%H:%M:%S", time.localtime(delay["until"]))
            rows.append((spec.name if first else "", slots if first else "", "lock-delay", "", "", "",
                         f"until {until}", _duration(delay["remaining"]), "granting nothing: state was lost"))
            first = False
        if first:
            rows.append((spec.name, slots, "free", "", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
