"""The event log: one readable line per pool event, written in batches
through twisted.logger, at once when the server is quiet and at most once
an interval when it is busy."""

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from distributex.eventlog import FLUSH_INTERVAL, MAX_BATCH, EventLog
from test_memory_backend import World

pytestmark = pytest.mark.timeout(60)


def logged(world, logs):
    """The event log's entries, as the lines twistd would write."""
    return [formatEvent(e).splitlines() for e in logs if e.get("log_namespace") == "distributex.pool"]


@pytest.fixture
def world():
    world = World()
    world.event_log = EventLog(world.clock, clock=world.clock.seconds)
    world.backend.observers.append(world.event_log.record)
    return world


def test_the_event_log_writes_one_line_per_event_naming_pool_kind_host_token_and_label(world):
    with capturedLogs() as logs:
        token = world.get("web3", "nightly backup").token
        world.clock.advance(0)
    assert logged(world, logs) == [[f"pool=p granted host=web3 token={token} label=\"nightly backup\""]]
    (entry,) = [e for e in logs if e.get("log_namespace") == "distributex.pool"]
    assert entry["log_level"] == LogLevel.info


def test_the_event_log_writes_the_events_of_one_reactor_turn_together_in_order(world):
    with capturedLogs() as logs:
        world.get("a")
        world.wait("b")
        world.release("a")
        world.clock.advance(0)
    (lines,) = logged(world, logs)
    assert [" ".join(line.split()[1:3]) for line in lines] == [
        "granted host=a", "queued host=b", "released host=a", "granted host=b"]


def test_the_event_log_keeps_braces_in_a_label(world):
    with capturedLogs() as logs:
        world.get("a", "{weird} label}")
        world.clock.advance(0)
    assert "label=\"{weird} label}\"" in logged(world, logs)[0][0]


def test_a_quiet_server_logs_an_event_at_the_end_of_its_reactor_turn(world):
    world.clock.advance(3600)
    with capturedLogs() as logs:
        world.get("a")
        assert logged(world, logs) == []
        world.clock.advance(0)
    assert len(logged(world, logs)) == 1


def test_a_busy_server_writes_at_most_one_entry_per_interval(world):
    with capturedLogs() as logs:
        world.get("a")
        world.clock.advance(0)
        for _ in range(3):
            world.release("a")
            world.get("a")
            world.clock.advance(FLUSH_INTERVAL / 4)
        assert len(logged(world, logs)) == 1
        world.clock.advance(FLUSH_INTERVAL)
    entries = logged(world, logs)
    assert len(entries) == 2
    assert len(entries[1]) == 6  # released, granted three times: all in the second entry


def test_flush_writes_what_is_pending_at_once(world):
    with capturedLogs() as logs:
        world.get("a")
        world.event_log.flush()
        assert len(logged(world, logs)) == 1
        world.clock.advance(FLUSH_INTERVAL)
    assert len(logged(world, logs)) == 1


def test_a_full_batch_is_written_at_once_whatever_the_timers_do(world):
    # The reactor's timers run on the wall clock: one stepped back would
    # hold a batch for as long; a full batch does not wait for them.
    with capturedLogs() as logs:
        world.get("a")
        world.clock.advance(0)
        for _ in range(MAX_BATCH):
            world.get("a")  # a renewal: one line each
        assert len(logged(world, logs)) == 2
    assert len(world.event_log._lines) < MAX_BATCH


def test_pacing_follows_the_monotonic_clock_not_the_reactors():
    from twisted.internet.task import Clock

    reactor, monotonic = Clock(), Clock()
    event_log = EventLog(reactor, clock=monotonic.seconds)
    event_log.record(_event())
    reactor.advance(0)  # written: the next entry is paced from now
    reactor.advance(-3600)  # the wall clock steps back an hour
    event_log.record(_event())
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() <= FLUSH_INTERVAL


def _event():
    from distributex.pool import GRANTED, Event
    return Event(GRANTED, "p", "a", "", 1, None, 0.0)
