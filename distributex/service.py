"""The twistd / twist plugin: options, and the services a server is made of."""

from __future__ import annotations

import signal
import sys
from typing import Any, List

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.python import usage

from distributex.backend import make_backend
from distributex.backend.statefile import StateFileError
from distributex.config import DEFAULT_PORT, ConfigError, load_config
from distributex.eventlog import EventLog
from distributex.web import DistributexResource, DistributexSite


class Options(usage.Options):
    synopsis = "[-c distributex.yaml] [-p PORT | --listen ENDPOINT ...] [--access-log]"
    longdesc = ("A fair network mutex and semaphore service. --listen takes a Twisted "
                "endpoint string (tcp:9889:interface=127.0.0.1, unix:/run/dx.sock, ssl:...), "
                "may repeat, and replaces -p.")
    optParameters = [
        ["config", "c", "distributex.yaml", "The YAML file that defines the pools."],
        ["port", "p", None, f"TCP port on all interfaces (default {DEFAULT_PORT})."],
    ]
    optFlags = [
        ["access-log", None, "Log every HTTP request (off by default: it costs throughput)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """An endpoint to listen on (repeatable); replaces -p."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        port = self["port"]
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise usage.UsageError(f"--port must be a TCP port number, not {port!r}")
        _readable_logs_under_twist(getattr(self, "parent", None))

    def endpoints(self) -> List[str]:
        if self["listen"]:
            return list(self["listen"])
        return [f"tcp:{self['port'] or DEFAULT_PORT}"]


#: After SIGTERM every open /wait has been answered NO, but the answers sit
#: in socket buffers; the reactor needs a moment to write them before it
#: closes every connection on its way out.
SHUTDOWN_FLUSH = 0.2


class DistributexService(MultiService):
    """All the server's services; stops them as the contract says SIGTERM must."""

    def __init__(self, reactor: Any, event_log: EventLog) -> None:
        super().__init__()
        self.reactor = reactor
        self.event_log = event_log

    def stopService(self) -> Any:
        # Children stop in reverse order: the listeners first (stop accepting),
        # then the backend, which answers every open /wait with NO.
        d = super().stopService()
        d.addCallback(lambda _: deferLater(self.reactor, SHUTDOWN_FLUSH, self.event_log.flush))
        # twistd and twist re-raise the signal that stopped the reactor, so
        # the process would die "killed by SIGTERM"; the contract promises a
        # clean exit 0 for a requested shutdown. There is no public API.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        return d


class Listener(StreamServerEndpointService):
    """Listen on one endpoint; failing to listen stops the start, in one line."""

    # Fail inside privilegedStartService, before the reactor runs, instead
    # of logging the error and running a server that listens nowhere.
    _raiseSynchronously = True

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            _stop(f"cannot listen on {self.description}: {e}")


def _readable_logs_under_twist(parent: Any) -> None:
    """Make ``twist`` write text lines, as twistd does, unless told otherwise.

    twist writes JSON events when its output is not a terminal (a service
    manager, a pipe), which nobody reads as a log. It picks that default
    before parsing, and keeps no record of whether ``--log-format`` was
    given, so the command line is asked: an explicit ``--log-format json``
    still wins.
    """
    from twisted.application.twist._options import TwistOptions

    explicit = any(arg.startswith("--log-format") for arg in sys.argv)
    if isinstance(parent, TwistOptions) and not explicit:
        from twisted.logger import textFileLogObserver

        parent["fileLogObserverFactory"] = textFileLogObserver
        parent["logFormat"] = "text"


def _stop(message: str) -> None:
    # twistd prints a traceback for any other exception; a bad config is the
    # operator's mistake, not ours, so it gets one line and a non-zero exit.
    sys.stderr.write(f"distributex: {message}\n")
    raise SystemExit(1)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        _stop(str(e))

    event_log = EventLog(reactor)
    top = DistributexService(reactor, event_log)
    try:
        backend = make_backend(config, reactor)
    except StateFileError as e:
        _stop(str(e))
    backend.observers.append(event_log.record)
    backend.setServiceParent(top)

    site = DistributexSite(DistributexResource(backend, config.pools, reactor),
                           access_log=options["access-log"])
    for description in options.endpoints():
        try:
            endpoint = serverFromString(reactor, description)
        except Exception as e:
            _stop(f"--listen {description}: {e}")
        Listener(description, endpoint, site).setServiceParent(top)
    return top
