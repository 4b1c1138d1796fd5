"""Live pool events for operators: ``GET /events/`` as Server-Sent Events.

The hub observes the backend (Backend.observers), numbers each event, keeps
the last HISTORY_SIZE of them for ``Last-Event-ID`` resume, and pushes
each to the connected streams whose pool filter it passes. Every event is
serialised once, whatever the number of readers.

A reader that does not keep up never slows the server nor grows its
memory: when the socket's buffer is full (TCP back-pressure pauses the
stream), events wait in a per-reader backlog of at most MAX_BACKLOG_BYTES;
past it the reader is told so in one last event (``event: dropped``) and
disconnected. It may reconnect and resume from the last id it saw.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from distributex.pool import Event

log = Logger()

#: Events kept for resume: at a busy server's few thousand events a second
#: that is the last few seconds to minutes; at a cron cluster's pace, days.
#: Bounded in count, so memory is too (a few hundred bytes each).
HISTORY_SIZE = 10_000
#: What a paused reader may have waiting before it is dropped: a few
#: seconds of a busy server's events, and nothing to a server's memory.
MAX_BACKLOG_BYTES = 256 * 1024
#: A comment line this often keeps proxies from closing an idle stream, and
#: lets the server notice a reader that has gone.
KEEPALIVE_INTERVAL = 15.0
#: Tells EventSource clients how soon to reconnect after the stream ends.
RETRY_MS = 2000
#: A dropped reader's last event waits this long for it to read before the
#: connection (and what is still buffered for it) is cut.
DROP_GRACE = 10.0


def event_json(event: Event, event_id: int, at: float) -> Dict[str, Any]:
    """The data of one event, as the stream and the status page carry it."""
    return {"id": event_id, "kind": event.kind, "pool": event.pool, "host": event.host,
            "session": event.session or None, "label": event.label, "token": event.token, "at": at}


class EventHub:
    """Numbers, keeps and fans out pool events; ``record`` observes a backend."""

    def __init__(self, reactor: IReactorTime, wall: Callable[[], float] = time.time,
                 history: int = HISTORY_SIZE) -> None:
        self.reactor = reactor
        self.wall = wall
        # Ids start from the wall clock in milliseconds, so that a resume
        # asked of a restarted server names an id it never gave and is told
        # of the gap, instead of silently matching an unrelated event.
        self._next_id = int(wall() * 1000) * 1000
        # (id, event, wall time): serialised only when a reader needs it, so
        # that a server nobody follows pays a deque append per event.
        self._history: Deque[Tuple[int, Event, float]] = deque(maxlen=history)
        self._streams: Set[EventStream] = set()
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = reactor

    def start(self) -> None:
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False)

    def stop(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()
        for stream in list(self._streams):
            stream.close(b"event: shutdown\ndata: {\"reason\": \"server shutting down\"}\n\n")

    def record(self, event: Event) -> None:
        self._next_id += 1
        entry = (self._next_id, event, self.wall())
        self._history.append(entry)
        if self._streams:
            frame = _frame(*entry)
            for stream in list(self._streams):
                if stream.accepts(event.pool):
                    stream.send(frame)

    def subscribe(self, request: Request, accepts: Callable[[str], bool], last_id: Optional[str]) -> None:
        """Serve ``request`` as an event stream of the pools ``accepts`` says yes to."""
        stream = EventStream(self, request, accepts)
        self._streams.add(stream)
        request.notifyFinish().addBoth(lambda _: self._streams.discard(stream))
        stream.send(f"retry: {RETRY_MS}\n\n".encode())
        if last_id is not None:
            self._replay(stream, last_id)

    def _replay(self, stream: "EventStream", last_id: str) -> None:
        try:
            after = int(last_id)
        except ValueError:
            after = -1
        oldest = self._history[0][0] if self._history else self._next_id + 1
        if not oldest - 1 <= after <= self._next_id:
            # Events were missed (history too short, or another server
            # incarnation): say so, so that the reader reloads the status.
            gap = json.dumps({"reason": "events since that id are no longer known: reload the status",
                              "last_event_id": last_id})
            stream.send(f"event: gap\ndata: {gap}\n\n".encode())
            return
        for event_id, event, at in list(self._history):
            if event_id > after and stream.accepts(event.pool):
                stream.send(_frame(event_id, event, at))

    def _ping(self) -> None:
        for stream in list(self._streams):
            stream.send(b": keepalive\n\n")

    @property
    def readers(self) -> int:
        return len(self._streams)


def _frame(event_id: int, event: Event, at: float) -> bytes:
    data = json.dumps(event_json(event, event_id, at), separators=(",", ":"))
    return f"id: {event_id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


@implementer(IPushProducer)
class EventStream:
    """One reader's stream; a push producer, so the transport says when its
    buffer is full (pauseProducing) and empty again (resumeProducing)."""

    def __init__(self, hub: EventHub, request: Request, accepts: Callable[[str], bool]) -> None:
        self.hub = hub
        self.request = request
        self.accepts = accepts
        self._paused = False
        self._backlog: List[bytes] = []
        self._backlog_bytes = 0
        self._closed = False
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer the stream
        request.registerProducer(self, True)
        request.write(b"")  # the headers go out now, not with the first event

    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        if not self._paused:
            self.request.write(frame)
            return
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        if self._backlog_bytes > MAX_BACKLOG_BYTES:
            log.info("dropping an event reader that is {bytes} bytes behind", bytes=self._backlog_bytes)
            self._backlog = []
            reason = json.dumps({"reason": f"too slow: more than {MAX_BACKLOG_BYTES} bytes of events "
                                           f"were waiting; reconnect with Last-Event-ID to resume"})
            self.close(f"event: dropped\ndata: {reason}\n\n".encode(), abort=True)

    def close(self, last: bytes, abort: bool = False) -> None:
        """End the stream with a last event; with ``abort``, the reader (one
        that does not read) has DROP_GRACE seconds to take it, then the
        connection is cut whatever is left in its buffers."""
        if self._closed:
            return
        self._closed = True
        self.hub._streams.discard(self)
        request = self.request
        if request.finished or request._disconnected:
            return
        request.write(last)
        request.unregisterProducer()
        request.finish()
        transport = request.channel.transport if request.channel is not None else None
        if abort and transport is not None:
            transport.loseConnection()
            self.hub.reactor.callLater(DROP_GRACE, _abort, transport)

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
        for frame in backlog:
            self.send(frame)

    def stopProducing(self) -> None:
        self._closed = True
        self.hub._streams.discard(self)


def _abort(transport: Any) -> None:
    if transport.connected:
        transport.abortConnection()
