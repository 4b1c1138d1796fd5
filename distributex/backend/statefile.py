"""The in-memory backend's state file: holds and tokens that survive a restart.

The file is a journal. Its first line says what it is and which boot of
the machine wrote it; every later line is one JSON list of the durable
changes of one operation, written with a single ``write(2)`` before the
operation's answers leave the server::

    {"distributex_state": 1, "boot_id": "3b1f...", "written_at": 1796548101.79}
    [["+", "pool1", "web3", "a1b2", "nightly", 1796548101790351, 300.0, 5012.5, 1796548401.79, 1796548101.79, 0]]
    [["-", "pool1", "web3", "a1b2"]]

``+`` is a grant or renewal: pool, host, session, label, token, lease
length, expiry by the backend's clock, expiry by the wall clock, grant time
by the wall clock, renewals. ``-`` is a release or an expiry. ``t`` lines
(pool, last token) appear only in a compacted file. A process killed at
any moment loses nothing it has answered, since the kernel has the write
before the answer is sent; a machine crash can lose what the disk had not
yet stored, unless ``state_fsync`` is on.

Deadlines run on the backend's clock (CLOCK_BOOTTIME: monotonic, and
counting a suspend). After a restart on the same boot they are taken as
they are; after a reboot the wall clock is all there is, so a remaining
lease is taken from it but never longer than the lease itself: a clock
stepped back while the server was down cannot stretch a hold.

On start the file is read, then rewritten compacted; it is compacted again
whenever the journal has grown to twice its compacted size.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger

from distributex.config import PoolSpec
from distributex.pool import EXPIRED, GRANTED, RELEASED, RENEWED, RESET, Event, Hold, PoolState

log = Logger()

FORMAT_VERSION = 1
#: Journals smaller than this are never compacted: rewriting a few
#: megabytes costs more than reading them at the next start.
COMPACT_MIN_BYTES = 4 << 20
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"



#: One encoder for every line: json.dumps with separators builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class StateFileError(Exception):
    """The state file cannot be used; str() is the one line to print."""


def read_boot_id() -> str:
    """This boot of the machine, or "" where the kernel does not say."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class StateFile:
    """Where the in-memory backend writes its durable changes."""

    def __init__(self, path: str, clock: Callable[[], float], wall: Callable[[], float],
                 boot_id: Optional[str] = None, fsync: bool = False) -> None:
        self.path = path
        self.clock = clock
        self.wall = wall
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.fsync = fsync
        self._fd: Optional[int] = None
        self._guard: Optional[int] = None  # holds the flock of path.lock
        self._written = 0
        self._compacted = 0
        # Tokens of pools no longer configured: kept, so that a pool that
        # comes back never gives a token lower than it gave before.
        self._other_tokens: Dict[str, int] = {}

    # -- start ---------------------------------------------------------------

    def load(self, find: Callable[[str], Optional[PoolSpec]]) -> Dict[str, PoolState]:
        """The states the file keeps for the pools that ``find`` knows, as of now.

        Holds whose lease ran out while the server was down are dropped
        (their tokens are kept). Raises StateFileError for a file that is
        not a distributex state file or is damaged before its last line.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StateFileError(f"{self.path}: cannot read the state file: {e.strerror}") from None
        if not data:
            return {}
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        header = self._header(lines[0] if lines else torn)
        if not lines:
            return {}
        same_boot = bool(self.boot_id) and header.get("boot_id") == self.boot_id
        records: Dict[str, Dict[Tuple[str, str], list]] = {}
        tokens: Dict[str, int] = {}
        for number, line in enumerate(lines[1:], 2):
            try:
                changes = json.loads(line)
                for change in changes:
                    _replay(change, records, tokens)
            except (ValueError, TypeError, IndexError, KeyError):
                raise StateFileError(f"{self.path}: line {number}: damaged state file "
                                     f"(move it away to start with no holds)") from None
        if torn:
            # A write cut short by a machine crash: its operation was never
            # answered (with state_fsync) or was not yet on disk.
            log.warn("{path}: ignoring an incomplete last line", path=self.path)
        return self._states(find, records, tokens, same_boot)

    def _header(self, line: bytes) -> Dict[str, Any]:
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or "distributex_state" not in header:
            raise StateFileError(f"{self.path}: not a distributex state file "
                                 f"(state_file names another file?)")
        if header["distributex_state"] != FORMAT_VERSION:
            raise StateFileError(f"{self.path}: state file version {header['distributex_state']!r}, "
                                 f"this server reads version {FORMAT_VERSION}")
        return header

    def _states(self, find: Callable[[str], Optional[PoolSpec]], records: Dict[str, Dict[Tuple[str, str], list]],
                tokens: Dict[str, int], same_boot: bool) -> Dict[str, PoolState]:
        now, wall = self.clock(), self.wall()
        states: Dict[str, PoolState] = {}
        for name, last_token in tokens.items():
            if find(name) is None:
                self._other_tokens[name] = last_token
                if records.get(name):
                    log.warn("state file: pool {pool} is no longer configured; its holds are dropped",
                             pool=name)
                continue
            state = states[name] = PoolState(last_token=last_token)
            for (host, session), r in records.get(name, {}).items():
                label, token, lease, expires_m, expires_w, granted_w, renewals = r
                if lease == 0:
                    expires_at = None
                elif same_boot:
                    expires_at = expires_m
                else:
                    expires_at = now + min(expires_w - wall, lease)
                if expires_at is not None and expires_at <= now:
                    log.info("state file: pool={pool} host={host} token={token} expired while the "
                             "server was down", pool=name, host=host, token=token)
                    continue
                state.holders[(host, session)] = Hold(
                    host, label, token, now - max(0.0, wall - granted_w), expires_at,
                    None, None, session, renewals)
        return states

    # -- running -------------------------------------------------------------

    def open(self, specs: Dict[str, PoolSpec], states: Dict[str, PoolState]) -> None:
        """Start the journal: write the states as a compacted file.

        Raises StateFileError when the file cannot be written, or when
        another server already uses it (two servers sharing one file would
        each forget the other's holds).
        """
        try:
            self._guard = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateFileError(f"{self.path}: another distributex server uses this state file "
                                 f"(give each server its own working directory or state_file)") from None
        except OSError as e:
            raise StateFileError(f"{self.path}.lock: cannot open: {e.strerror}") from None
        try:
            self.compact(specs, states)
        except OSError as e:
            raise StateFileError(f"{self.path}: cannot write the state file: {e.strerror}") from None

    def record(self, spec: PoolSpec, events: List[Event], state: PoolState) -> None:
        """Write one operation's durable changes, before it is answered."""
        now = wall = 0.0
        changes = []
        for event in events:
            kind = event.kind
            if kind is GRANTED or kind is RENEWED:
                hold = state.holders.get((event.host, event.session))
                if hold is None:
                    continue  # granted and ended within the operation
                if not wall:
                    now, wall = self.clock(), self.wall()
                changes.append(_plus(spec, hold, now, wall))
            elif kind is RELEASED or kind is EXPIRED or (kind is RESET and event.token is not None):
                changes.append(["-", spec.name, event.host, event.session])
        if changes:
            self._append(_encode(changes).encode() + b"\n")

    def needs_compaction(self) -> bool:
        return self._written > max(COMPACT_MIN_BYTES, 2 * self._compacted)

    def close(self) -> None:
        self._close_journal()
        if self._guard is not None:
            os.close(self._guard)  # and with it the flock
            self._guard = None

    def _close_journal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, data: bytes) -> None:
        assert self._fd is not None, "open() first"
        os.write(self._fd, data)
        if self.fsync:
            os.fsync(self._fd)
        self._written += len(data)

    def compact(self, specs: Dict[str, PoolSpec], states: Dict[str, PoolState]) -> None:
        """Rewrite the file as the states alone, atomically."""
        now, wall = self.clock(), self.wall()
        header = {"distributex_state": FORMAT_VERSION, "boot_id": self.boot_id, "written_at": wall}
        parts = [json.dumps(header)]
        tokens = dict(self._other_tokens)
        tokens.update((name, s.last_token) for name, s in states.items() if s.last_token)
        if tokens:
            parts.append(json.dumps([["t", name, token] for name, token in tokens.items()]))
        holds = [_plus(specs[name], hold, now, wall) for name, s in states.items() for hold in s.holders.values()]
        if holds:
            parts.append(json.dumps(holds, separators=(",", ":")))
        data = ("\n".join(parts) + "\n").encode()
        temporary = f"{self.path}.new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)  # the rename must never expose a file the disk lacks
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        _fsync_directory(self.path)
        self._close_journal()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._written = self._compacted = len(data)


def _plus(spec: PoolSpec, hold: Hold, now: float, wall: float) -> list:
    # The lease length is stored so that after a reboot no hold runs longer
    # than a lease from the restart, whatever the wall clock did.
    if hold.expires_at is None:
        lease, expires_w = 0.0, None
    else:
        lease, expires_w = spec.expire, wall + (hold.expires_at - now)
    return ["+", spec.name, hold.host, hold.session, hold.label, hold.token,
            lease, hold.expires_at, expires_w, wall - (now - hold.granted_at), hold.renewals]


def _replay(change: list, records: Dict[str, Dict[Tuple[str, str], list]], tokens: Dict[str, int]) -> None:
    kind, name = change[0], change[1]
    if kind == "+":
        host, session, label, token, lease, expires_m, expires_w, granted_w, renewals = change[2:11]
        records.setdefault(name, {})[(str(host), str(session))] = [
            str(label), int(token), float(lease), expires_m, expires_w, float(granted_w), int(renewals)]
        tokens[name] = max(tokens.get(name, 0), int(token))
    elif kind == "-":
        records.get(name, {}).pop((str(change[2]), str(change[3])), None)
    elif kind == "t":
        tokens[name] = max(tokens.get(name, 0), int(change[2]))
    else:
        raise ValueError(kind)


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
