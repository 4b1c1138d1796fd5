"""The distributex HTTP protocol seen from a client, with no I/O in it.

What a request is, what an answer is, and what an answer means, shared by
the blocking flavour (:mod:`.wire`) and the Twisted one (:mod:`.txlocker`).
The client asks for the plain bodies (the *compat* ones: ``YES``, ``NO``,
``OK``, ``INVALID``, ``ERROR``) and reads the token and lease from headers.
"""

from __future__ import annotations

import os
from urllib.parse import urlencode

from distributex.client.errors import (
    InvalidRequest,
    ProtocolError,
    ServerError,
    ServerUnreachable,
)

TOKEN_HEADER = "x-distributex-token"
EXPIRE_HEADER = "x-distributex-expire"
REASON_HEADER = "x-distributex-reason"

# Statuses a proxy or load balancer in front of the server answers while the
# server itself is away: worth retrying, unlike a malformed answer.
_GATEWAY_STATUSES = frozenset({502, 503, 504})

_VERDICTS = frozenset({"YES", "NO", "OK"})


class Request:
    """One GET to send: ``path`` with query ``params``.

    ``timeout`` bounds the wait for the answer in seconds; ``None`` means
    wait as long as it takes (the long poll of ``/wait/`` with no timeout).
    """

    __slots__ = ("path", "params", "timeout")

    def __init__(self, path: str, params: dict[str, str], timeout: float | None) -> None:
        self.path = path
        self.params = params
        self.timeout = timeout

    def target(self, prefix: str = "") -> str:
        """The request target: path and query string, ASCII only."""
        return f"{prefix}{self.path}?{urlencode(self.params)}"

    def __repr__(self) -> str:
        return f"Request({self.target()!r}, timeout={self.timeout!r})"


class Answer:
    """One HTTP answer: status, body bytes, headers with lower-case names."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body!r})"


class Grant:
    """A lock the server granted: the fencing token and the lease.

    ``expire`` is the lease in seconds (0: it never expires) and
    ``granted_at`` when the lease started by the client's clock.
    """

    __slots__ = ("token", "expire", "granted_at")

    def __init__(self, token: int, expire: float, granted_at: float) -> None:
        self.token = token
        self.expire = expire
        self.granted_at = granted_at

    def __repr__(self) -> str:
        return f"Grant(token={self.token}, expire={self.expire})"


# Random bytes in a session: 64 bits, so that two acquisitions of one host
# never draw the same session (a birthday collision needs ~4e9 of them).
SESSION_BYTES = 8


def new_session() -> str:
    """A fresh random session (hex): the holder is the pair (host, session),
    so that two runs on one host, or two lockers of one process, exclude
    each other. ``os.urandom``, not :mod:`uuid` or :mod:`secrets`, whose
    imports would slow the wrapper's start."""
    return os.urandom(SESSION_BYTES).hex()


def lock_params(pool: str, host: str, label: str | None = None,
                timeout: float | None = None, session: str | None = None) -> dict[str, str]:
    """The query parameters of ``/get/``, ``/wait/`` and ``/release/``."""
    params = {"pool": pool, "host": host}
    if session is not None:
        params["session"] = session
    if timeout is not None:
        params["timeout"] = format_seconds(timeout)
    if label:
        params["label"] = label
    return params


def format_seconds(seconds: float) -> str:
    """Seconds as a short decimal: ``2``, ``2.5``, ``0.125``."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def verdict(answer: Answer) -> str:
    """What the answer says: ``YES``, ``NO`` or ``OK``.

    Anything else is raised: ``INVALID`` as :class:`InvalidRequest`,
    ``ERROR`` as :class:`ServerError`, a proxy's gateway error as
    :class:`ServerUnreachable` and the rest as :class:`ProtocolError`.
    """
    # The contract's bodies carry no newline, but a proxy may add one.
    body = answer.body.strip().decode("ascii", "replace")
    if body in _VERDICTS:
        return body
    reason = answer.headers.get(REASON_HEADER, "")
    if body == "INVALID":
        raise InvalidRequest(answer.status, reason or "no reason given")
    if body == "ERROR":
        raise ServerError(f"server error (HTTP {answer.status}): "
                          f"{reason or 'its lock backend is unavailable'}")
    if answer.status in _GATEWAY_STATUSES:
        raise ServerUnreachable(f"the server is unavailable (HTTP {answer.status})")
    raise ProtocolError(f"unexpected answer (HTTP {answer.status}): {body[:80]!r}")


def grant_of(answer: Answer, granted_at: float) -> Grant:
    """The token and lease a ``YES`` carries in its headers."""
    try:
        token = int(answer.headers[TOKEN_HEADER])
        expire = float(answer.headers[EXPIRE_HEADER])
    except (KeyError, ValueError):
        raise ProtocolError("a YES without valid X-Distributex-Token and "
                            "X-Distributex-Expire headers") from None
    if expire < 0:
        raise ProtocolError(f"a negative lease: X-Distributex-Expire: {expire}")
    return Grant(token, expire, granted_at)


def default_host() -> str:
    """The holder identity by default: this machine's FQDN (*compat*)."""
    import socket

    return socket.getfqdn()
