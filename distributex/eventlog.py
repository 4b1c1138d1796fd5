"""One readable log line for every pool event."""

from __future__ import annotations

from twisted.logger import Logger

from distributex.pool import Event

log = Logger(namespace="distributex.pool")


def log_event(event: Event) -> None:
    """An observer for Backend.observers: log the event through twisted.logger."""
    log.info(
        "pool={pool} {kind} host={host} token={token} label={label}",
        pool=event.pool, kind=event.kind, host=event.host,
        token=event.token if event.token is not None else "-",
        label=event.label or "-",
        distributex_event=event.kind,
    )
