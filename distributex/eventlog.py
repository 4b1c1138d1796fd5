"""One readable log line for every pool event, through twisted.logger.

Emitting a twisted.logger event costs a twistd server about 40
microseconds (event dict, observers, timestamp, format, write), about as
much as answering a request; at ten thousand grants a second, logging each
as its own event would halve the throughput. So the lines go out together
as one twisted.logger event: at the end of the reactor turn in which they
happened when the server is quiet, and at most once every FLUSH_INTERVAL
seconds when it is busy. The first line carries the entry's timestamp, the
others follow it on lines of their own, indented with a tab by twistd's
log format::

    2026-11-23T01:14:28+0000 [distributex.pool#info] pool=pool1 released host=me token=1795396467935064 by=10.0.0.11
    	pool=pool1 granted host=w2 token=1795396468775170 label="nightly backup" by=10.0.0.12

Code that wants the events as data rather than text observes the backend
itself (Backend.observers), as this log does.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable, List, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from distributex.pool import Event

log = Logger(namespace="distributex.pool")

#: Seconds a busy server lets lines gather before writing them as one entry.
FLUSH_INTERVAL = 0.1
#: Lines written at once whatever the timer says: the reactor's timers run
#: on the wall clock, and one stepped back would hold the batch (and its
#: memory) until it caught up. A thousand lines is about 0.1 s of a busy
#: server's events.
MAX_BATCH = 1000


def quote(value: str) -> str:
    """A request value as it may appear in a log line: bare when it is a
    plain name, else a JSON string with every non-ASCII character and every
    quote escaped, so that no value can end the line or fake a field
    (a host of "x token=1", or one with U+2028 or U+0085 in it)."""
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=True)


_PLAIN = re.compile(r"[A-Za-z0-9_.:@/-]+")


def describe(event: Event) -> str:
    """The event as one line: pool=... KIND host=... [session=...] [token=...]
    [label=...] [by=...]: by is who caused it (client address and access
    name), absent for what the server did by itself."""
    session = f" session={event.session}" if event.session else ""
    token = "" if event.token is None else f" token={event.token}"
    label = f" label={json.dumps(event.label, ensure_ascii=True)}" if event.label else ""
    by = f" by={quote(event.origin)}" if event.origin else ""
    return f"pool={event.pool} {event.kind} host={quote(event.host)}{session}{token}{label}{by}"


class EventLog:
    """Logs every event in batches; ``record`` is its observer for Backend.observers."""

    def __init__(self, reactor: IReactorTime, interval: float = FLUSH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reactor = reactor
        self.interval = interval
        self.clock = clock
        # Lines, not Events: strings are not tracked by the garbage
        # collector, so a batch held for an interval costs it nothing.
        self._lines: List[str] = []
        self._flush_call: Optional[IDelayedCall] = None
        self._last_flush = float("-inf")

    def record(self, event: Event) -> None:
        self._lines.append(describe(event))
        if len(self._lines) >= MAX_BATCH:
            self.flush()
        elif self._flush_call is None:
            delay = self._last_flush + self.interval - self.clock()
            self._flush_call = self.reactor.callLater(min(self.interval, max(0.0, delay)), self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        self._last_flush = self.clock()
        # The lines are a field, not the format string: twisted.logger's
        # formatter walks a format string in Python, character by character.
        log.info("{distributex_lines}", distributex_lines="\n".join(lines))
