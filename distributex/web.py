"""The HTTP face of distributex: /get/, /wait/, /release/, /status/.

This module parses requests and writes answers; what the answers mean is
decided by the pool rules behind the backend. Plain answers are the exact
2014 bytes (YES, NO, OK, INVALID, ERROR, no newline); JSON on request.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from io import BytesIO
from typing import IO, Any, Callable, Dict, List, Literal, Optional, Tuple, overload

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site, version
from zope.interface import implementer

from distributex.backend import Backend, BackendUnavailable, QueueFull, ShuttingDown, WaitReset
from distributex.access import ADMIN, ADMIN_PATHS, OPEN_PATHS, AccessEntry, AccessList
from distributex.catalog import Catalog, PoolSpec
from distributex.channel import ConnectionLimits, DistributexChannel
from distributex.lean import http_date
from distributex.pool import Hold
from distributex.status import status_json, status_table

log = Logger()

#: Longer values are refused: a host name, pool or label is a short string,
#: and a bound keeps one request from filling the server's memory or logs.
MAX_PARAM_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A session names one acquisition by a client (contract guarantee 5).
SESSION_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

YES, NO, OK, INVALID, ERROR = b"YES", b"NO", b"OK", b"INVALID", b"ERROR"
TEXT = b"text/plain"
JSON = b"application/json"
METHODS = (b"GET", b"POST")


class BadRequest(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@overload
def _param(request: Request, name: bytes) -> str: ...


@overload
def _param(request: Request, name: bytes, required: Literal[False]) -> Optional[str]: ...


def _param(request: Request, name: bytes, required: bool = True) -> Optional[str]:
    """One parameter as text: given once, at most 1 KiB, UTF-8, no control characters."""
    values = request.args.get(name)
    if values is None:
        if required:
            raise BadRequest(400, f"missing parameter '{name.decode()}'")
        return None
    if len(values) == 1:
        raw = values[0]
        # The common case, checked in C: printable ASCII has no control characters.
        if raw and len(raw) <= MAX_PARAM_BYTES and raw.isascii():
            value = raw.decode("ascii")
            if value.isprintable():
                return value
    return _checked_param(name, values, required)


def _checked_param(name: bytes, values: Optional[List[bytes]], required: bool) -> Optional[str]:
    """The slow path of _param: every check, and the reason when one fails."""
    if not values:
        if required:
            raise BadRequest(400, f"missing parameter '{name.decode()}'")
        return None
    if len(values) > 1:
        raise BadRequest(400, f"parameter '{name.decode()}' given more than once")
    value = _text(name, values[0])
    if required and not value:
        raise BadRequest(400, f"parameter '{name.decode()}' is empty")
    return value


def _text(name: bytes, raw: bytes) -> str:
    """A parameter value: short, UTF-8, no control characters."""
    if len(raw) > MAX_PARAM_BYTES:
        raise BadRequest(400, f"parameter '{name.decode()}' is longer than {MAX_PARAM_BYTES} bytes")
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, f"parameter '{name.decode()}' is not UTF-8") from None
    if _CONTROL.search(value):
        raise BadRequest(400, f"parameter '{name.decode()}' contains control characters")
    return value


def _timeout(request: Request) -> Optional[float]:
    text = _param(request, b"timeout", required=False)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(400, "parameter 'timeout' must be a number of seconds >= 0")
    return seconds


def _wants_json(request: Request) -> bool:
    values = request.args.get(b"format")
    if values is None:
        accept = request.getHeader(b"accept")
        return accept is not None and JSON in accept
    if values == [b"json"]:
        return True
    if values == [b"text"]:
        return False
    raise BadRequest(400, "parameter 'format' must be 'json' or 'text'")


def client_address(request: Request) -> str:
    """Who sent the request: an IP address, or "unix" for a Unix socket."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host is not None else "unix"


def _origin(request: Request) -> str:
    """Who asked, for the audit log: the client's address, and the name of
    the access entry whose secret it gave (contract section 6)."""
    access = getattr(request, "access", None)
    address = client_address(request)
    return f"{address} {access.name}" if access is not None else address


def _who(spec: PoolSpec, host: str, session: str) -> Dict[str, Any]:
    """The JSON fields that name a holder: a session only when the request gave one."""
    if session:
        return {"pool": spec.name, "host": host, "session": session}
    return {"pool": spec.name, "host": host}


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _gone(request: Request) -> bool:
    # Twisted documents _disconnected on Request; there is no public query.
    return bool(request._disconnected or request.finished)


def _send(request: Request, code: int, word: bytes, as_json: bool,
          fields: Optional[Dict[str, Any]] = None) -> None:
    if request._disconnected or request.finished:  # _gone(request), on the hot path
        return
    if as_json:
        body = {"result": word.decode()}
        if fields:
            body.update(fields)
        data, content_type = json.dumps(body).encode(), JSON
    else:
        data, content_type = word, TEXT
    if code != 200:  # Twisted's default; setting it costs a little on every answer
        request.setResponseCode(code)
    if fields and "reason" in fields:
        request.setHeader(b"x-distributex-reason", fields["reason"].encode())
    _write(request, data, content_type)


def _write(request: Request, data: bytes, content_type: bytes) -> None:
    """The whole body, with its length: no chunked encoding, as in 2014."""
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", _LENGTHS.get(data) or b"%d" % len(data))
    request.write(data)
    request.finish()


_LENGTHS = {word: b"%d" % len(word) for word in (YES, NO, OK, INVALID, ERROR)}

#: What a backend answers at once: a Hold, the reason of a NO (str), or
#: True/False; anything else is a Deferred of one. Tested this way round
#: because isinstance(x, Deferred) goes through ABCMeta and costs several
#: times more.
_ANSWERS = (Hold, str, bool)


Handler = Callable[[Request, bool], None]


class DistributexResource(Resource):
    """The whole HTTP API as one leaf resource."""

    isLeaf = True

    def __init__(self, backend: Backend, pools: Catalog, reactor: IReactorTime,
                 on_backend_error: Callable[[], None] = lambda: None,
                 access: Optional[AccessList] = None) -> None:
        super().__init__()
        self.backend = backend
        self.reactor = reactor
        self.on_backend_error = on_backend_error
        self._routes: Dict[bytes, Handler] = {}
        self.add_routes({b"/get": self._get, b"/wait": self._wait, b"/release": self._release,
                         b"/status": self._status})
        self.configure(pools, access or AccessList(()))

    def configure(self, pools: Catalog, access: AccessList) -> None:
        """Serve these pools, to these secrets, from now on (a reload)."""
        self.pools = pools
        self.access = access
        self._access_on = bool(access)  # checked on every request: a plain attribute
        self._expire_headers = {name: _seconds(spec.expire).encode() for name, spec in pools.items()}

    def add_routes(self, routes: Dict[bytes, Handler]) -> None:
        """Serve more paths; the trailing slash is optional: both spellings,
        looked up as they come."""
        for path, handler in routes.items():
            self._routes[path] = handler
            if not path.endswith(b"/") and not path.startswith(b"/static/"):
                self._routes[path + b"/"] = handler

    def render(self, request: Request) -> Any:
        as_json = False
        try:
            as_json = _wants_json(request)
            handler = self._routes.get(request.path)
            if handler is None:
                raise BadRequest(404, "unknown path")
            if self._access_on and request.path not in OPEN_PATHS:
                self._authorize(request)
            if request.method not in METHODS:
                request.setHeader(b"allow", b"GET, POST")
                raise BadRequest(405, "method not allowed (use GET or POST)")
            handler(request, as_json)
        except BadRequest as e:
            _send(request, e.code, INVALID, as_json, {"reason": e.reason})
        except Exception:
            self._failed(Failure(), request, as_json)
        return NOT_DONE_YET

    def _authorize(self, request: Request) -> None:
        entry = self.access.identify(request.getHeader(b"authorization"))
        if entry is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="distributex"')
            raise BadRequest(401, "a known secret is needed: Authorization: Bearer SECRET")
        if entry.role != ADMIN and request.path in ADMIN_PATHS:
            raise BadRequest(403, f"access '{entry.name}' is not admin")
        request.access = entry  # type: ignore[attr-defined]  # a DistributexRequest

    def may_use(self, request: Request, pool: str) -> bool:
        """Whether the request's access entry (if any) covers the pool."""
        entry = getattr(request, "access", None)
        return entry is None or entry.allows_pool(pool)

    # -- endpoints -----------------------------------------------------------

    def _pool(self, request: Request, host: Optional[str] = None, draining: bool = False) -> PoolSpec:
        """The pool a request names; with ``draining``, also a pool removed
        by a reload whose holds have not all ended (they may be released)."""
        name = _param(request, b"pool")
        spec = self.pools.find(name)
        if spec is None and draining:
            spec = self.backend.draining(name)
        if spec is None:
            raise BadRequest(404, f"unknown pool '{name}'")
        if self._access_on and not self.may_use(request, name):
            raise BadRequest(403, f"access '{request.access.name}' may not use pool '{name}'")  # type: ignore[attr-defined]
        if host is not None and not spec.allows(host):
            raise BadRequest(403, f"host '{host}' is not allowed in pool '{name}'")
        return spec

    def _holder(self, request: Request, draining: bool = False) -> Tuple[PoolSpec, str, str]:
        """The pool, host and session of a /get, /wait or /release."""
        host = _param(request, b"host")
        spec = self._pool(request, host, draining)
        session = _param(request, b"session", required=False)
        if session is None:
            return spec, host, ""  # the 2014 identity: the host alone
        if not SESSION_RE.fullmatch(session):
            raise BadRequest(400, "parameter 'session' must match [A-Za-z0-9_.:-]{1,128}")
        return spec, host, session

    def _get(self, request: Request, as_json: bool) -> None:
        spec, host, session = self._holder(request)
        label = _param(request, b"label", required=False) or ""
        self._reply(self.backend.get(spec.name, host, label, session, _origin(request)), self._answer_hold,
                    request, as_json,
                    spec, host, session)

    def _reply(self, result: Any, answer: Callable[..., None], request: Request, as_json: bool,
               *args: Any) -> None:
        """answer(result, request, as_json, *args), now or when the backend has answered."""
        if isinstance(result, _ANSWERS):
            answer(result, request, as_json, *args)
        else:
            result.addCallback(answer, request, as_json, *args)
            result.addErrback(self._failed, request, as_json)

    def _answer_hold(self, hold: Any, request: Request, as_json: bool, spec: PoolSpec, host: str,
                     session: str) -> None:
        if hold.__class__ is str:  # the reason of a NO
            _send(request, 200, NO, as_json, dict(_who(spec, host, session), reason=hold))
        else:
            self._yes(request, spec, host, session, hold.token, as_json)

    def _yes(self, request: Request, spec: PoolSpec, host: str, session: str, token: int, as_json: bool) -> None:
        request.setHeader(b"x-distributex-token", b"%d" % token)
        request.setHeader(b"x-distributex-expire", self._expire_headers.get(spec.name)
                          or _seconds(spec.expire).encode())
        fields = None
        if as_json:
            fields = _who(spec, host, session)
            fields.update(token=token, expires_in=spec.expire or None)
        _send(request, 200, YES, as_json, fields)

    def _wait(self, request: Request, as_json: bool) -> None:
        spec, host, session = self._holder(request)
        label = _param(request, b"label", required=False) or ""
        timeout = _timeout(request)
        request.long_poll = True  # type: ignore[attr-defined]  # a DistributexRequest: see DistributexChannel
        waiter = self.backend.wait(spec.name, host, label, session, _origin(request))
        if timeout is not None:
            waiter.addTimeout(timeout, self.reactor)
        # A client that hangs up leaves the queue at once.
        request.notifyFinish().addErrback(lambda _: waiter.cancel())

        def granted(event: Any) -> None:
            self._yes(request, spec, host, session, event.token, as_json)

        def not_granted(reason: Failure) -> None:
            if reason.check(TimeoutError):
                _send(request, 200, NO, as_json, dict(_who(spec, host, session), reason="timed out"))
            elif reason.check(WaitReset):
                _send(request, 409, NO, as_json, dict(_who(spec, host, session), reason="reset by an operator"))
            elif reason.check(QueueFull):
                _send(request, 429, INVALID, as_json, dict(_who(spec, host, session), reason=str(reason.value)))
            elif reason.check(ShuttingDown):
                _send(request, 503, NO, as_json, dict(_who(spec, host, session), reason="server shutting down"))
            elif not reason.check(CancelledError):
                self._failed(reason, request, as_json)

        waiter.addCallbacks(granted, not_granted)

    def _release(self, request: Request, as_json: bool) -> None:
        spec, host, session = self._holder(request, draining=True)
        self._reply(self.backend.release(spec.name, host, session, _origin(request)), self._answer_release,
                    request, as_json,
                    spec, host, session)

    def _answer_release(self, released: bool, request: Request, as_json: bool, spec: PoolSpec, host: str,
                        session: str) -> None:
        _send(request, 200, OK, as_json, dict(_who(spec, host, session), released=released))

    def _status(self, request: Request, as_json: bool) -> None:
        names: List[str] = []
        for raw in request.args.get(b"pool", []):
            name = _text(b"pool", raw)
            if self.pools.find(name) is None and self.backend.draining(name) is None:
                raise BadRequest(404, f"unknown pool '{name}'")
            if not self.may_use(request, name):
                raise BadRequest(403, f"access '{request.access.name}' may not see pool '{name}'")  # type: ignore[attr-defined]
            names.append(name)
        if not names:
            names = [n for n in self.backend.active_pools() if self.may_use(request, n)]
        StatusStream(self, request, names, as_json).start()

    def _failed(self, reason: Failure, request: Request, as_json: bool) -> None:
        if reason.check(BackendUnavailable):
            self.on_backend_error()
            _send(request, 503, ERROR, as_json, {"reason": f"backend unavailable: {reason.value}"})
        else:
            log.failure("answering {uri}", reason, uri=request.uri)
            _send(request, 500, ERROR, as_json, {"reason": "internal error"})


#: Pools rendered per reactor turn by a /status/ of many pools: a few
#: milliseconds of work, so that other requests are never held up longer.
STATUS_BATCH = 100
#: A /status/ reader that has not taken what was sent for this long is
#: dropped, with what was waiting for it: it would hold memory for nothing.
STALLED_READER_TIMEOUT = 30.0


@implementer(IPushProducer)
class StatusStream:
    """One /status/ answer. A few pools go out at once, with a length; many
    go out in batches, one per reactor turn, as a chunked answer that stops
    while the reader's socket is full (TCP back-pressure) and is dropped if
    the reader stays stalled."""

    def __init__(self, resource: "DistributexResource", request: Request, names: List[str],
                 as_json: bool) -> None:
        self.resource = resource
        self.request = request
        self.names = names
        self.as_json = as_json
        self._next = 0
        self._paused = False
        self._busy = False  # a batch is being read from the backend
        self._done = False
        self._stall: Optional[IDelayedCall] = None

    def start(self) -> None:
        if len(self.names) <= STATUS_BATCH:
            d = self.resource.backend.status(self.names)
            d.addCallback(self._whole)
            d.addErrback(self.resource._failed, self.request, self.as_json)
            return
        request = self.request
        request.setHeader(b"content-type", JSON if self.as_json else b"text/plain; charset=utf-8")
        request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(lambda _: self.stopProducing())
        if self.as_json:
            request.write(b'{"pools": [')
        self._batch()

    def _whole(self, pools: list) -> None:
        if _gone(self.request):
            return
        if self.as_json:
            _write(self.request, json.dumps(status_json(pools)).encode(), JSON)
        else:
            _write(self.request, status_table(pools).encode(), b"text/plain; charset=utf-8")

    def _batch(self) -> None:
        if self._done or self._paused or self._busy:
            return
        first = self._next
        names = self.names[first:first + STATUS_BATCH]
        self._next += len(names)
        self._busy = True
        d = self.resource.backend.status(names)
        d.addCallback(self._write_batch, first == 0)
        d.addErrback(self._failed)

    def _write_batch(self, pools: list, first: bool) -> None:
        self._busy = False
        if self._done:
            return
        if self.as_json:
            body = json.dumps(status_json(pools)["pools"])[1:-1]
            self.request.write((body if first else "," + body).encode())
        else:
            table = status_table(pools)
            self.request.write((table if first else table.split("\n", 1)[1]).encode())
        if self._next < len(self.names):
            self.resource.reactor.callLater(0, self._batch)
            return
        self._done = True
        if self.as_json:
            self.request.write(b"]}")
        self.request.unregisterProducer()
        self.request.finish()

    def _failed(self, reason: Failure) -> None:
        # Part of the answer is out: the only honest end is to cut it.
        self._done = True
        if not reason.check(BackendUnavailable):
            log.failure("streaming /status/", reason)
        if not _gone(self.request):
            self.request.unregisterProducer()
            self.request.channel.transport.abortConnection()  # type: ignore[union-attr]

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True
        if self._stall is None:
            self._stall = self.resource.reactor.callLater(STALLED_READER_TIMEOUT, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        self._batch()

    def stopProducing(self) -> None:
        self._done = True
        if self._stall is not None and self._stall.active():
            self._stall.cancel()

    def _stalled(self) -> None:
        self._stall = None
        self._done = True
        log.info("dropping a /status/ reader that read nothing for {seconds:g} s",
                 seconds=STALLED_READER_TIMEOUT)
        transport = self.request.channel.transport if self.request.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]


class DistributexRequest(Request):
    """A Request that goes straight to the site's one resource.

    ``long_poll`` is true for a /wait: an answer that may take any time.

    twisted.web's own ``process`` splits and unquotes the path, walks the
    resource tree and formats the Date header, which together cost about a
    tenth of a request; DistributexResource is a leaf at the root that
    routes on ``request.path`` itself, so none of that is needed
    (``prepath`` and ``postpath`` stay unset).
    """

    long_poll = False
    access: Optional[AccessEntry] = None  # the access entry whose secret it carried

    def process(self) -> None:
        self.site = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        self.setHeader(b"server", version)
        self.setHeader(b"date", http_date())
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())


class DistributexSite(Site):
    """A Site of DistributexRequests whose per-request access log is off unless asked for.

    Formatting and writing one access line costs a large share of a
    request's time; pool events are logged anyway.
    """

    noisy = False
    requestFactory = DistributexRequest
    protocol = DistributexChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 negotiation wrapper

    def __init__(self, resource: Resource, access_log: bool = False,
                 limits: Optional[ConnectionLimits] = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log
        self.limits = limits if limits is not None else ConnectionLimits()

    def buildProtocol(self, addr: Any) -> Any:
        address = getattr(addr, "host", None)
        refused = self.limits.refusal(address, self.reactor.callLater)
        if refused is not None:
            log.info("refusing a connection from {address}: at a connection limit", address=address)
            return refused
        channel = super().buildProtocol(addr)
        channel._limits, channel._address = self.limits, address
        channel.lean_path = channel.lean_path and not self.access_log
        self.limits.opened(address)
        return channel

    def log(self, request: Request) -> None:  # type: ignore[override]  # twisted.web's own is typed narrower
        if self.access_log:
            super().log(request)

    def getContentFile(self, length: Optional[int]) -> IO[bytes]:
        """Where a request's body goes: memory unless it is large or of unknown
        length, as twisted.web's default. Without this optional hook of
        Site's, twisted.web raises and catches an AttributeError for every
        request to find that default."""
        if length is not None and length < 100_000:
            return BytesIO()
        return tempfile.TemporaryFile()
