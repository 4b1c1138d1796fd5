"""One readable log line for every pool event, through twisted.logger.

Formatting a log event costs a twistd server about 30 to 80 microseconds
(timestamp, format string, write), as much as answering a request; at ten
thousand grants a second, logging each as its own event would halve the
throughput. So the lines of one reactor turn (which happened at the same
instant) go out together as one twisted.logger event: the first line
carries the timestamp, and the others follow it on lines of their own,
indented with a tab by twistd's log format::

    2026-11-23T01:14:28+0000 [distributex.pool#info] pool=pool1 released host=me token=1795396467935064
    	pool=pool1 granted host=w2 token=1795396468775170 label='nightly backup'

The structured events ride along in the log event as ``distributex_events``
for observers that want data rather than text.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from distributex.pool import Event

log = Logger(namespace="distributex.pool")


def describe(event: Event) -> str:
    """The event as one line: pool=... KIND host=... [token=...] [label=...]."""
    line = f"pool={event.pool} {event.kind} host={event.host}"
    if event.token is not None:
        line += f" token={event.token}"
    if event.label:
        line += f" label={event.label!r}"
    return line


class EventLog:
    """An observer for Backend.observers that logs every event, one turn at a time."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._events: List[Event] = []
        self._flush_call: Optional[IDelayedCall] = None

    def __call__(self, event: Event) -> None:
        self._events.append(event)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._events:
            return
        events, self._events = self._events, []
        text = "\n".join(map(describe, events))
        # The text is the format string: escape the braces a host or label may hold.
        log.info(text.replace("{", "{{").replace("}", "}}"), distributex_events=[
            (e.kind, e.pool, e.host, e.label, e.token, e.at) for e in events])
