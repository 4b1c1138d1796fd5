"""Access control (contract section 6): who may ask what.

With ``access`` configured, every request but ``/health`` (and the status
page's own files, which hold no data) carries ``Authorization: Bearer
SECRET``. A secret names one entry: ``admin`` may do everything; ``client``
may take, wait for, release and look at the pools its ``pools`` patterns
match, and nothing on an admin path (``/reset/``). Secrets come from files
that only their owner may read, are compared in constant time, and never
appear in a log or an answer.
"""

from __future__ import annotations

import fnmatch
import hmac
import os
import stat
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

ADMIN = "admin"
CLIENT = "client"
ROLES = (ADMIN, CLIENT)
#: Paths only the admin role may use.
ADMIN_PATHS = frozenset({b"/reset", b"/reset/"})
#: Paths served to anyone: the load balancer's probe, and the status page's
#: files (its data comes from /status/ and /events/, which need a secret).
OPEN_PATHS = frozenset({b"/health", b"/health/", b"/", b"/static/page.js", b"/static/page.css"})


class AccessError(ValueError):
    """An access entry that cannot be used; str() says why."""


@dataclass(frozen=True)
class AccessEntry:
    name: str
    role: str
    pools: Optional[Tuple[str, ...]]  # fnmatch patterns; None: every pool
    secret: bytes = field(repr=False)  # never in a repr, so never in a log

    def allows_pool(self, pool: str) -> bool:
        if self.role == ADMIN or self.pools is None:
            return True
        return any(fnmatch.fnmatchcase(pool, pattern) for pattern in self.pools)


def read_secret(path: str) -> bytes:
    """The secret in ``path`` (one line), refusing a file every user can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise AccessError(f"cannot read {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AccessError(f"{path} is not a regular file")
        if info.st_mode & stat.S_IROTH:
            raise AccessError(f"{path} is readable by every user: chmod o-r {path} (600 or 640)")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    secret = data.strip()
    if not secret:
        raise AccessError(f"{path} is empty")
    if len(data) > 4096 or b"\n" in secret or b" " in secret:
        raise AccessError(f"{path} must hold one secret on one line (at most 4096 bytes, no spaces)")
    return secret


class AccessList:
    """The configured entries; ``identify`` finds the entry a request's secret names."""

    def __init__(self, entries: Sequence[AccessEntry]) -> None:
        self.entries = tuple(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def identify(self, authorization: Optional[bytes]) -> Optional[AccessEntry]:
        """The entry whose secret the header carries, or None. Every entry is
        compared, each in constant time, so the time taken says nothing of
        which secret was close."""
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        offered = authorization[7:].strip()
        found = None
        for entry in self.entries:
            if hmac.compare_digest(offered, entry.secret):
                found = entry
        return found
