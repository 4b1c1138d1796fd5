"""The operators' endpoints (contract section 5): the live page, events,
metrics, health and reset. The lock endpoints are in distributex.web; this
module adds its routes to that resource (``DistributexResource.add_routes``)."""

from __future__ import annotations

import ipaddress
from importlib import resources
from typing import Callable, Dict, Set

from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from distributex.backend import Backend
from distributex.catalog import Catalog
from distributex.events import EventHub
from distributex.metrics import PoolMetrics
from distributex.pool import Step
from distributex.web import (
    ERROR,
    OK,
    BadRequest,
    DistributexResource,
    Handler,
    client_address,
    _origin,
    _param,
    _send,
    _text,
    _write,
)

log = Logger(namespace="distributex.operators")

#: The page may load scripts, styles and data from its own origin only; no
#: inline script, no frames, no forms elsewhere.
PAGE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_FILES = {b"/": ("index.html", b"text/html; charset=utf-8"),
              b"/static/page.js": ("page.js", b"text/javascript; charset=utf-8"),
              b"/static/page.css": ("page.css", b"text/css; charset=utf-8")}
#: prometheus_client's text exposition format.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Operators:
    """The operator endpoints of one server."""

    def __init__(self, backend: Backend, pools: Callable[[], Catalog], hub: EventHub, metrics: PoolMetrics,
                 reactor: IReactorTime) -> None:
        self.backend = backend
        self.pools = pools
        self.hub = hub
        self.metrics = metrics
        self.reactor = reactor
        self._page = {path: (resources.files("distributex.page").joinpath(name).read_bytes(), kind)
                      for path, (name, kind) in PAGE_FILES.items()}

    def install(self, resource: DistributexResource) -> None:
        routes: Dict[bytes, Handler] = {b"/events": self._events, b"/metrics": self._metrics,
                                        b"/health": self._health, b"/reset": self._reset}
        routes.update((path, self._static) for path in PAGE_FILES)
        resource.add_routes(routes)

    # -- the page ------------------------------------------------------------

    def _static(self, request: Request, as_json: bool) -> None:
        body, kind = self._page[request.path]
        request.setHeader(b"content-security-policy", PAGE_CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        _write(request, body, kind)

    # -- /events/ ------------------------------------------------------------

    def _events(self, request: Request, as_json: bool) -> None:
        names = self._pool_filter(request)
        # EventSource sends Last-Event-ID when it reconnects; a reader that
        # cannot set headers may say last_event_id= instead.
        raw = request.getHeader(b"last-event-id")
        if raw is None:
            raw = (request.args.get(b"last_event_id") or [None])[0]
        self.hub.subscribe(request, names, None if raw is None else raw.decode("ascii", "replace"))

    def _pool_filter(self, request: Request) -> Callable[[str], bool]:
        """Which pools' events the stream carries: the named ones, else all,
        and only those the request's access entry covers."""
        names: Set[str] = set()
        entry = getattr(request, "access", None)
        for raw in request.args.get(b"pool", []):
            name = _text(b"pool", raw)
            if self.pools().find(name) is None:
                raise BadRequest(404, f"unknown pool '{name}'")
            if entry is not None and not entry.allows_pool(name):
                raise BadRequest(403, f"access '{entry.name}' may not see pool '{name}'")
            names.add(name)
        if names:
            return names.__contains__
        if entry is not None:
            return entry.allows_pool
        return _every_pool

    # -- /metrics ------------------------------------------------------------

    def _metrics(self, request: Request, as_json: bool) -> None:
        d = deferToThread(self.metrics.exposition)  # never on the reactor: see distributex.metrics

        def send(body: bytes) -> None:
            if not (request.finished or request._disconnected):
                _write(request, body, METRICS_CONTENT_TYPE)

        d.addCallbacks(send, lambda f: _internal(f, request, as_json))

    # -- /health -------------------------------------------------------------

    def _health(self, request: Request, as_json: bool) -> None:
        def answer(healthy: bool) -> None:
            if healthy:
                _send(request, 200, OK, as_json, None)
            else:
                _send(request, 503, ERROR, as_json, {"reason": "backend unavailable"})

        d = self.backend.health()
        d.addCallbacks(answer, lambda f: answer(False))

    # -- /reset/ -------------------------------------------------------------

    def _reset(self, request: Request, as_json: bool) -> None:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise BadRequest(405, "method not allowed (reset with POST)")
        who = _origin(request)
        if getattr(request, "access", None) is None and not is_loopback(client_address(request)):
            # With access control the admin role was checked already.
            raise BadRequest(403, "reset needs the admin role; without access control only from loopback")
        name = _param(request, b"pool")
        spec = self.pools().find(name) or self.backend.draining(name)
        if spec is None:
            raise BadRequest(404, f"unknown pool '{name}'")
        host = _param(request, b"host", required=False)
        session = _param(request, b"session", required=False)
        if session is not None and host is None:
            raise BadRequest(400, "parameter 'session' needs 'host'")
        result = self.backend.reset(name, host, session, _origin(request))

        def done(step: Step) -> None:
            holds = [{"host": e.host, "session": e.session or None, "token": e.token}
                     for e in step.events if e.kind == "reset" and e.token is not None]
            dropped = sum(1 for e in step.events if e.kind == "reset" and e.token is None)
            what = f"host {host!r}" + (f" session {session!r}" if session else "") if host else "every hold and waiter"
            log.info("reset of pool {pool} ({what}) by {who}: {holds} hold(s) ended, {dropped} waiter(s) "
                     "answered NO", pool=name, what=what, who=who, holds=len(holds), dropped=dropped)
            _send(request, 200, OK, as_json, {"pool": name, "ended": holds, "dropped_waiters": dropped})

        if isinstance(result, Step):
            done(result)
        else:
            result.addCallbacks(done, lambda f: _internal(f, request, as_json))


def _every_pool(pool: str) -> bool:
    return True


def is_loopback(address: str) -> bool:
    if address == "unix":
        return True  # only this machine can reach a Unix socket
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _internal(failure: Failure, request: Request, as_json: bool) -> None:
    from distributex.backend import BackendUnavailable

    if failure.check(BackendUnavailable):
        _send(request, 503, ERROR, as_json, {"reason": f"backend unavailable: {failure.value}"})
        return
    log.failure("answering {uri}", failure, uri=request.uri)
    _send(request, 500, ERROR, as_json, {"reason": "internal error"})

