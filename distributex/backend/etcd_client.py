"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``), on
Twisted: nothing here blocks the reactor. Watches go on twisted.web's
Agent; the other requests on kept-alive connections of our own whose
answers httptools parses (etcd_http.py), or on the Agent where httptools
is not installed (PyPy).

Why the gateway and not a gRPC library: the gateway is part of every etcd
v3 server (3.3 and later; 3.4 serves ``/v3/``), speaks HTTP/1.1 and JSON,
and Twisted already speaks both; the Python gRPC clients block, or need a
second event loop (asyncio) beside the reactor, and the maintained etcd
client libraries are built on them. The price: one watch (a chunked answer
of JSON lines) per HTTP stream, and one lease keep-alive per request, both
of which distributex uses sparingly (one watch and one keep-alive a second
per server).

Keys and values travel base64-encoded; 64-bit integers as decimal strings;
fields at their default value (0, "", false) are left out of answers.

Failover: requests go to the endpoint that last answered; one that cannot
be reached (refused, reset, timed out) is left for the next one, in turn.
Whether a failed request may be sent again is the caller's to judge
(:class:`NotSent` is safe to repeat; :class:`Ambiguous` may have been
applied); :meth:`EtcdClient.call` repeats read-only requests by itself.

TLS: an https endpoint is verified against ``cacert`` (else the system's
trust store), with a client certificate when ``cert``/``key`` are given.
Authentication: with ``user``, the client asks ``/v3/auth/authenticate`` for
a token and sends it in the ``Authorization`` header; a token that etcd no
longer accepts is replaced once per request.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from distributex.backend.base import BackendUnavailable
from distributex.backend.etcd_http import AVAILABLE as LEAN_AVAILABLE
from distributex.backend.etcd_http import Address, LeanHTTP

log = Logger()

#: One request to one endpoint: past this it counts as unreachable.
REQUEST_TIMEOUT = 2.0
#: How long :meth:`EtcdClient.call` keeps trying a read-only request (over
#: every endpoint, and through a leader election) before giving up.
READ_DEADLINE = 6.0
#: Pause between rounds over the endpoints, doubled each round (bounded).
RETRY_PAUSE = 0.05


class EtcdError(BackendUnavailable):
    """etcd could not do it; str() says why."""


class NotSent(EtcdError):
    """The request certainly had no effect: safe to send again."""


class Ambiguous(EtcdError):
    """The request may or may not have been applied."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Optional[str]) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end[:len(end)])
        end.pop()
    return b"\0"


class KV:
    """One key-value as etcd returned it."""

    __slots__ = ("key", "value", "create_revision", "mod_revision", "version", "lease")

    def __init__(self, raw: Dict[str, Any]) -> None:
        self.key = unb64(raw.get("key"))
        self.value = unb64(raw.get("value"))
        self.create_revision = int(raw.get("create_revision", 0))
        self.mod_revision = int(raw.get("mod_revision", 0))
        self.version = int(raw.get("version", 0))
        self.lease = int(raw.get("lease", 0))

    @classmethod
    def written(cls, key: bytes, value: bytes, revision: int, lease: int = 0,
                before: Optional["KV"] = None) -> "KV":
        """The key-value a put at ``revision`` leaves (over ``before``, if the key existed)."""
        kv = cls.__new__(cls)
        kv.key, kv.value, kv.mod_revision, kv.lease = key, value, revision, lease
        kv.create_revision = before.create_revision if before is not None else revision
        kv.version = before.version + 1 if before is not None else 1
        return kv

    def __repr__(self) -> str:
        return f"KV({self.key!r}, mod={self.mod_revision})"


# -- building requests ---------------------------------------------------------------


def range_op(key: bytes, end: Optional[bytes] = None, limit: int = 0, count_only: bool = False,
             keys_only: bool = False) -> Dict[str, Any]:
    op: Dict[str, Any] = {"key": b64(key)}
    if end is not None:
        op["range_end"] = b64(end)
    if limit:
        op["limit"] = str(limit)
    if count_only:
        op["count_only"] = True
    if keys_only:
        op["keys_only"] = True
    return {"request_range": op}


def put_op(key: bytes, value: bytes, lease: int = 0) -> Dict[str, Any]:
    op: Dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def delete_op(key: bytes, end: Optional[bytes] = None) -> Dict[str, Any]:
    op: Dict[str, Any] = {"key": b64(key)}
    if end is not None:
        op["range_end"] = b64(end)
    return {"request_delete_range": op}


def mod_is(key: bytes, revision: int) -> Dict[str, Any]:
    """Compare: the key's last change is ``revision`` (0: the key is absent)."""
    if revision == 0:
        return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def range_kvs(response: Dict[str, Any]) -> Tuple[List[KV], int]:
    """The kvs and count of one ``response_range`` of a txn answer."""
    r = response.get("response_range", {})
    return [KV(kv) for kv in r.get("kvs", ())], int(r.get("count", 0))


# -- transport -----------------------------------------------------------------------


@implementer(IBodyProducer)
class _Body:
    """A request body written at once (FileBodyProducer waits a reactor turn)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Verify etcd's certificate against the given CA (or the system's
    store), and present a client certificate when one is configured."""

    def __init__(self, cacert: Optional[str], cert: Optional[str], key: Optional[str]) -> None:
        from twisted.internet import ssl

        self._trust: Any = ssl.platformTrust()
        if cacert is not None:
            with open(cacert, "rb") as f:
                self._trust = ssl.Certificate.loadPEM(f.read())
        self._client: Any = None
        if cert is not None and key is not None:
            with open(cert, "rb") as f, open(key, "rb") as g:
                self._client = ssl.PrivateCertificate.loadPEM(f.read() + b"\n" + g.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet import ssl

        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                       clientCertificate=self._client)


#: Errors of a connection that never carried the request.
_UNSENT = (netError.ConnectionRefusedError, netError.ConnectError, netError.DNSLookupError,
           netError.NoRouteError, netError.TCPTimedOutError)

#: etcd errors that say the request was not applied.
_NOT_APPLIED = ("no leader", "too many requests", "not capable", "leader changed while",
                "requested lease not found", "too many operations", "invalid auth token",
                "user name is empty", "permission denied", "authentication failed",
                "not supported", "request is too large", "key is not provided",
                "duplicate key", "required revision has been compacted", "future revision")


class EtcdClient:
    """Requests to a set of etcd endpoints, with failover, TLS and auth."""

    def __init__(self, endpoints: Sequence[str], reactor: IReactorTime, cacert: Optional[str] = None,
                 cert: Optional[str] = None, key: Optional[str] = None, user: Optional[str] = None,
                 password: Optional[str] = None, timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.reactor = reactor
        self.timeout = timeout
        self.user = user
        self.password = password
        self._token: Optional[str] = None
        self._current = 0  # the endpoint that last answered
        policy = _TLSPolicy(cacert, cert, key) if any(urlsplit(e).scheme == "https" for e in self.endpoints) \
            else None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 32
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietFactory  # a write must never be sent twice behind our back
        kwargs: Dict[str, Any] = {"pool": self.pool}
        if policy is not None:
            kwargs["contextFactory"] = policy
        self.agent = Agent(reactor, **kwargs)
        # Requests with an answer of their own go on lean connections where
        # httptools is installed (etcd_http.py); watches always on the Agent.
        self.lean = LeanHTTP(reactor, policy.creatorForNetloc if policy is not None else None) \
            if LEAN_AVAILABLE else None
        self._addresses: Dict[str, Address] = {}
        # Watches get their own connections: a stream never returns to a pool.
        self.stream_pool = HTTPConnectionPool(reactor, persistent=False)
        self.stream_pool._factory = _QuietFactory
        skwargs: Dict[str, Any] = {"pool": self.stream_pool}
        if policy is not None:
            skwargs["contextFactory"] = policy
        self.stream_agent = Agent(reactor, **skwargs)

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current % len(self.endpoints)]

    def _failed_over(self, endpoint: str) -> None:
        if self.endpoint == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    def _headers(self) -> Headers:
        headers = Headers({b"content-type": [b"application/json"]})
        if self._token is not None:
            headers.addRawHeader(b"authorization", self._token.encode())
        return headers

    async def _authenticate(self, endpoint: str) -> None:
        body = json.dumps({"name": self.user, "password": self.password}).encode()
        answer = await self._post(endpoint, "/v3/auth/authenticate", body, authenticate=False)
        token = answer.get("token")
        if not token:
            raise NotSent("etcd authentication gave no token")
        self._token = token

    async def _post(self, endpoint: str, path: str, body: bytes, authenticate: bool = True) -> Dict[str, Any]:
        """One request to one endpoint: its JSON answer, or NotSent/Ambiguous/EtcdError."""
        if authenticate and self.user is not None and self._token is None:
            await self._authenticate(endpoint)
        d: Deferred[Any]
        if self.lean is not None:
            token = b"authorization: %s\r\n" % self._token.encode() if authenticate and self._token else b""
            d = self.lean.post(self._address(endpoint), path, body, token).addCallback(
                lambda reply: _json_answer(*reply))
        else:
            headers = self._headers() if authenticate else Headers({b"content-type": [b"application/json"]})
            d = self.agent.request(b"POST", (endpoint + path).encode(), headers, _Body(body)).addCallback(_read_json)
        d.addTimeout(self.timeout, self.reactor)
        status: int
        answer: Dict[str, Any]
        try:
            status, answer = await d
        except _UNSENT as e:
            raise NotSent(f"etcd {endpoint}: {e.__class__.__name__}") from None
        except netError.ConnectingCancelledError:
            # The timeout fell while connecting: nothing was written.
            raise NotSent(f"etcd {endpoint}: no connection within {self.timeout:g} s") from None
        except (CancelledError, netError.TimeoutError, DeferredTimeout):
            raise Ambiguous(f"etcd {endpoint} did not answer within {self.timeout:g} s") from None
        except ValueError:
            raise Ambiguous(f"etcd {endpoint}: an answer that is not JSON") from None
        except Exception as e:
            # The connection broke after (or while) the request was sent;
            # a connection from the pool that had died unseen fails the same way.
            raise Ambiguous(f"etcd {endpoint}: {e.__class__.__name__}") from None
        if status == 200 and "error" not in answer:
            return answer
        message = str(answer.get("message") or answer.get("error") or f"HTTP {status}")
        if authenticate and self.user is not None and ("auth token" in message or "user name is empty" in message):
            self._token = None
            raise _Reauthenticate(message)
        if any(m in message for m in _NOT_APPLIED) or status in (404, 405, 400):
            raise NotSent(f"etcd {endpoint}: {message}")
        raise Ambiguous(f"etcd {endpoint}: {message}")

    def _address(self, endpoint: str) -> Address:
        address = self._addresses.get(endpoint)
        if address is None:
            url = urlsplit(endpoint)
            scheme = url.scheme or "http"
            address = self._addresses[endpoint] = (scheme, url.hostname or "localhost",
                                                   url.port or (443 if scheme == "https" else 80))
        return address

    async def request(self, path: str, payload: Dict[str, Any], endpoint: Optional[str] = None) -> Dict[str, Any]:
        """One try, on the current endpoint (or the one given): the answer,
        or an error saying whether it may have been applied. A connection
        that fails moves the client on to the next endpoint."""
        endpoint = endpoint or self.endpoint
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            try:
                return await self._post(endpoint, path, body)
            except _Reauthenticate:
                return await self._post(endpoint, path, body)
        except EtcdError as e:
            if not isinstance(e, NotSent) or not _is_answer(e):
                self._failed_over(endpoint)
            raise

    async def call(self, path: str, payload: Dict[str, Any], deadline: float = READ_DEADLINE,
                   retry_ambiguous: bool = True) -> Dict[str, Any]:
        """A request, sent again (to the next endpoints, after a pause) while
        it fails, for up to ``deadline`` seconds; for read-only requests, and
        for those that may safely be applied twice (``retry_ambiguous``)."""
        start = self.reactor.seconds()
        pause = RETRY_PAUSE
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.request(path, payload)
            except EtcdError as e:
                if isinstance(e, Ambiguous) and not retry_ambiguous:
                    raise
                if _is_final(e) or self.reactor.seconds() - start + pause > deadline or attempt > 200:
                    raise
                if attempt % len(self.endpoints) == 0:
                    await deferLater(self.reactor, pause, lambda: None)
                    pause = min(pause * 2, 0.5)

    # -- the API used by the backend -------------------------------------------------

    async def txn(self, compare: List[Dict[str, Any]], success: List[Dict[str, Any]],
                  failure: Optional[List[Dict[str, Any]]] = None, read_only: bool = False,
                  deadline: float = READ_DEADLINE) -> Dict[str, Any]:
        payload: Dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            payload["failure"] = failure
        if read_only:
            return await self.call("/v3/kv/txn", payload, deadline)
        return await self.request("/v3/kv/txn", payload)

    async def grant(self, ttl: int) -> Tuple[int, int, int]:
        """A new lease: (id, ttl, the revision etcd is at)."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"]), int(answer.get("TTL", 0)), int(answer["header"]["revision"])

    async def keepalive(self, lease: int) -> int:
        """Refresh the lease; its TTL now (0: it has expired)."""
        answer = await self.request("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", answer).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)}, deadline=2.0)
        except NotSent as e:
            if "lease not found" not in str(e):
                raise

    def watch(self, key: bytes, end: bytes, start_revision: int, on_message: Callable[[Dict[str, Any]], None],
              endpoint: Optional[str] = None) -> "WatchStream":
        """Start a watch stream from ``start_revision``; ``on_message`` gets
        each decoded ``result``. The stream's ``done`` fires when it ends."""
        endpoint = endpoint or self.endpoint
        payload = {"create_request": {"key": b64(key), "range_end": b64(end),
                                      "start_revision": str(start_revision)}}
        return WatchStream(self, endpoint, json.dumps(payload).encode(), on_message)

    def close(self) -> Deferred:
        closing = [self.pool.closeCachedConnections()]
        if self.lean is not None:
            closing.append(self.lean.close())
        return DeferredList(closing)


class _Reauthenticate(EtcdError):
    """The auth token was refused: get a new one and send once more."""


def _is_answer(e: EtcdError) -> bool:
    """An error etcd itself answered (the endpoint is fine)."""
    text = str(e)
    return not any(m in text for m in ("no leader", "Refused", "ConnectError", "NoRoute", "DNSLookup",
                                       "TCPTimedOut", "not capable"))


def _is_final(e: EtcdError) -> bool:
    """An error that sending again will not cure."""
    text = str(e)
    return any(m in text for m in ("permission denied", "authentication failed", "too many operations",
                                   "request is too large", "compacted", "future revision",
                                   "lease not found"))


def _json_answer(code: int, body: bytes) -> Tuple[int, Dict[str, Any]]:
    """(status, the JSON object answered); ValueError if it is none."""
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        if code != 200:
            return code, {"message": body[:200].decode("utf-8", "replace")}
        raise
    if not isinstance(answer, dict):
        raise ValueError("not an object")
    return code, answer


def _read_json(response: Any) -> Deferred:
    return readBody(response).addCallback(lambda body: _json_answer(response.code, body))


class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" line in the log for every connection to etcd."""

    noisy = False


class _LineReader(Protocol):
    """Splits a chunked answer into JSON lines."""

    def __init__(self, on_line: Callable[[bytes], None], finished: Deferred) -> None:
        self.on_line = on_line
        self.finished = finished
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if not sep:
                break
            self.buffer = rest
            if line.strip():
                self.on_line(line)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.buffer.strip():
            try:
                self.on_line(self.buffer)
            except Exception:
                pass
        self.buffer = b""
        self.finished.callback(reason)


class WatchStream:
    """One watch: a POST /v3/watch whose answer never ends while it lives."""

    def __init__(self, client: EtcdClient, endpoint: str, body: bytes,
                 on_message: Callable[[Dict[str, Any]], None]) -> None:
        self.endpoint = endpoint
        self.on_message = on_message
        self.created = False
        self.error: Optional[str] = None
        self.done: Deferred[Optional[str]] = Deferred()
        self._response: Any = None
        self._stopped = False
        d = self._request = client.stream_agent.request(b"POST", (endpoint + "/v3/watch").encode(),
                                                        client._headers(), _Body(body))
        d.addTimeout(client.timeout, client.reactor)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, response: Any) -> None:
        self._response = response
        if response.code != 200:
            self.error = f"watch answered HTTP {response.code}"
        finished: Deferred[Any] = Deferred()
        finished.addBoth(self._ended)
        response.deliverBody(_LineReader(self._line, finished))
        if self._stopped:
            self.stop()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.error = "a watch message that is not JSON"
            self.stop()
            return
        if "error" in message:
            err = message["error"]
            self.error = str(err.get("message") or err) if isinstance(err, dict) else str(err)
            self.stop()
            return
        result = message.get("result", {})
        if result.get("created"):
            self.created = True
        self.on_message(result)

    def _failed(self, reason: Failure) -> None:
        self.error = f"watch on {self.endpoint}: {reason.value.__class__.__name__}"
        if not self.done.called:
            self.done.callback(self.error)

    def _ended(self, reason: Any) -> None:
        if not self.done.called:
            if self.error is None and not self._stopped:
                self.error = f"watch on {self.endpoint} ended"
            self.done.callback(self.error)

    def stop(self) -> None:
        """End the stream (its ``done`` fires)."""
        self._stopped = True
        response = self._response
        if response is None:
            if not self._request.called:
                self._request.cancel()
            return
        transport = getattr(response, "_transport", None)  # a TransportProxyProducer
        if transport is not None:
            transport.stopProducing()
