"""The twistd / twist plugin: options, and the services a server is made of."""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import threading
from typing import Any, List

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage

from distributex import __version__
from distributex.backend import Backend, make_backend
from distributex.backend.statefile import StateFileError
from distributex.channel import ConnectionLimits
from distributex.config import DEFAULT_PORT, Config, ConfigError, load_config
from distributex.eventlog import EventLog
from distributex.events import EventHub
from distributex.metrics import PoolMetrics
from distributex.operators import Operators
from distributex.web import DistributexResource, DistributexSite


log = Logger(namespace="distributex")


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
        listen = list(self["listen"]) or [f"tcp:{self['port'] or DEFAULT_PORT}"]
        return [_with_backlog(e) for e in listen]


#: After SIGTERM every open /wait has been answered NO, but the answers sit
#: in socket buffers; the reactor needs a moment to write them before it
#: closes every connection on its way out.
SHUTDOWN_FLUSH = 0.2


class DistributexService(MultiService):
    """All the server's services; reloads on SIGHUP, and stops as the
    contract says SIGTERM must."""

    def __init__(self, reactor: Any, event_log: EventLog, config: Config, backend: Backend,
                 resource: DistributexResource, hub: EventHub, metrics: PoolMetrics,
                 endpoints: List[str]) -> None:
        super().__init__()
        self.reactor = reactor
        self.event_log = event_log
        self.config = config
        self.backend = backend
        self.resource = resource
        self.hub = hub
        self.metrics = metrics
        self.endpoints = endpoints

    def privilegedStartService(self) -> None:
        # twistd listens here, and loads the backend's state only later.
        self._reload_on_sighup()
        super().privilegedStartService()

    def startService(self) -> None:
        self._reload_on_sighup()  # twist starts without privilegedStartService
        super().startService()
        self.hub.start()
        config = self.config
        state = config.state_file if config.backend == "inmemory" else None
        log.info("distributex {version}: config {config}, backend {backend}, {pools} pool(s) and {patterns} "
                 "pattern(s), listening on {endpoints}, state file {state}, access control {access}",
                 version=__version__, config=config.source, backend=config.backend, pools=len(config.pools),
                 patterns=len(config.pools.patterns), endpoints=", ".join(self.endpoints),
                 state=os.path.abspath(state) if state else "none",
                 access=f"on ({len(config.access.entries)} entries)" if config.access else "off")
        if not config.access and not all(_loopback_only(e) for e in self.endpoints):
            log.warn("no access control: anyone who can reach {endpoints} can take and release any lock",
                     endpoints=", ".join(e for e in self.endpoints if not _loopback_only(e)))
        # What start-up made (the pools, their states, Twisted's own) lives
        # as long as the process: out of the garbage collector's scans, so
        # that a full collection in a server of 100,000 pools takes
        # milliseconds instead of a tenth of a second.
        if hasattr(gc, "freeze"):  # CPython; PyPy's collector needs no help
            gc.collect()
            gc.freeze()

    def _reload_on_sighup(self) -> None:
        # Before any listener starts: once the port accepts, a SIGHUP (a
        # deploy script reloading straight after a start) must reload, not
        # kill the server by the signal's default action.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self) -> None:
        """Re-read the configuration file (SIGHUP): new pools appear, removed
        ones drain, changed settings apply to new grants; a bad file changes
        nothing."""
        try:
            new = load_config(self.config.source)
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            return
        changes = describe_changes(self.config, new)
        self.backend.reconfigure(new.pools)
        self.resource.configure(new.pools, new.access)
        self.metrics.forget_labels()
        self.config = new
        log.info("reloaded {config}: {changes}", config=new.source, changes="; ".join(changes) or "no change")

    def stopService(self) -> Any:
        self.hub.stop()
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


#: The listen backlog of TCP and TLS endpoints that do not name one. Twisted's
#: default of 50 overflows when a cron minute starts a few hundred clients at
#: once (each overflow costs the client a 1 s SYN retry); the kernel caps it
#: at net.core.somaxconn (4096 on current Linux).
DEFAULT_BACKLOG = 1024


def _with_backlog(endpoint: str) -> str:
    kind = endpoint.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


def require_client_certificates(endpoint: Any, ca_path: str) -> Any:
    """An ssl: endpoint that also requires a client certificate signed by a
    CA of ``ca_path``; other endpoints as they are. Twisted's ssl: endpoint
    string has no option for it: its certificate options are rebuilt."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint

    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint
    with open(ca_path, "rb") as f:
        pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", f.read(), re.DOTALL)
    if not pems:
        raise ValueError(f"tls_client_ca {ca_path} holds no PEM certificate")
    old = endpoint._sslContextFactory
    endpoint._sslContextFactory = ssl.CertificateOptions(
        privateKey=old.privateKey, certificate=old.certificate, extraCertChain=old.extraCertChain,
        verify=True, requireCertificate=True,
        caCerts=[ssl.Certificate.loadPEM(pem).original for pem in pems])
    return endpoint


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


#: Settings a running server cannot change: they name where the state is.
RESTART_KEYS = ("backend", "memcache_servers", "namespace", "poll_interval", "state_file", "state_fsync")


def describe_changes(old: Config, new: Config) -> List[str]:
    """What a reload changes, for its log line."""
    changes = []
    before, after = old.pools, new.pools
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and after[n] != before[n]]
    if added:
        changes.append(f"new pools {', '.join(added)}")
    if removed:
        changes.append(f"removed pools {', '.join(removed)} (their holds run out; new requests get 404)")
    if changed:
        changes.append(f"changed pools {', '.join(changed)} (for new grants and renewals)")
    old_patterns = {p.pattern: p.template for p in before.patterns}
    new_patterns = {p.pattern: p.template for p in after.patterns}
    if old_patterns != new_patterns:
        changes.append(f"patterns now {', '.join(new_patterns) or 'none'}")
    if old.access.entries != new.access.entries:
        changes.append(f"access control now {len(new.access.entries)} entries "
                       f"({', '.join(e.name for e in new.access.entries) or 'off'})")
    for key in RESTART_KEYS:
        if getattr(old, key) != getattr(new, key):
            changes.append(f"{key} changed: it takes effect at the next restart")
    return changes


def _loopback_only(endpoint: str) -> bool:
    if endpoint.startswith("unix:"):
        return True
    interface = re.search(r"interface=([^:]+)", endpoint)
    return interface is not None and interface.group(1).strip("[]") in ("127.0.0.1", "::1", "localhost")


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        _stop(str(e))

    event_log = EventLog(reactor)
    try:
        backend = make_backend(config, reactor)
    except StateFileError as e:
        _stop(str(e))
    hub = EventHub(reactor)
    limits = ConnectionLimits(config.max_connections_per_client, config.reserved_fds)
    metrics = PoolMetrics(lambda name: top.config.pools.find(name), backend.lock_delays, connections=limits)
    for observer in (event_log.record, hub.record, metrics.record):
        backend.observers.append(observer)
    resource = DistributexResource(backend, config.pools, reactor, on_backend_error=metrics.count_backend_error,
                                   access=config.access)
    top = DistributexService(reactor, event_log, config, backend, resource, hub, metrics, options.endpoints())
    backend.setServiceParent(top)
    Operators(backend, lambda: top.config.pools, hub, metrics, reactor).install(resource)

    site = DistributexSite(resource, access_log=options["access-log"], limits=limits)
    for description in options.endpoints():
        try:
            endpoint = serverFromString(reactor, description)
            if config.tls_client_ca is not None:
                endpoint = require_client_certificates(endpoint, config.tls_client_ca)
        except Exception as e:
            _stop(f"--listen {description}: {e}")
        Listener(description, endpoint, site).setServiceParent(top)
    return top
