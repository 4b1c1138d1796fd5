"""The local lock of ``-l``: ``flock`` on one file per pool.

An flock belongs to the open file and the kernel drops it when the process
dies, however it dies: unlike the 2014 PID file it can never go stale, and
the file is never deleted (deleting a lock file lets two processes lock two
different files of the same name).

Where the files live, first that applies:

1. ``$DISTRIBUTEX_LOCK_DIR``, when set;
2. ``/run/distributex`` for root (when ``/run`` is writable);
3. ``$TMPDIR/distributex-UID`` (``/tmp/distributex-UID``), one per user.

Not ``$XDG_RUNTIME_DIR``: a login session sets it, cron does not, and it is
removed at logout, so the same user's cron job and interactive run would
lock different files and overlap.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from urllib.parse import quote

from distributex.client.errors import LockBusy, LockTimeout

LOCK_DIR_ENV = "DISTRIBUTEX_LOCK_DIR"
ROOT_LOCK_DIR = "/run/distributex"

# Polling for a lock under a timeout (flock itself cannot time out): start
# fast, since a short job frees it soon, and settle at a pace that costs
# nothing while the handover stays under a tenth of a second.
POLL_FIRST = 0.005
POLL_MAX = 0.1


def lock_dir() -> str:
    """The directory of the lock files, created if needed (see the module)."""
    explicit = os.environ.get(LOCK_DIR_ENV)
    if explicit:
        os.makedirs(explicit, mode=0o755, exist_ok=True)
        return explicit
    if os.geteuid() == 0 and os.access(os.path.dirname(ROOT_LOCK_DIR), os.W_OK):
        os.makedirs(ROOT_LOCK_DIR, mode=0o755, exist_ok=True)
        return ROOT_LOCK_DIR
    path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"distributex-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        _check_private(path)
    return path


def _check_private(path: str) -> None:
    # In a shared /tmp another user could have made the directory first, or
    # a link, to hold our locks or read our pool names: refuse to use it.
    info = os.lstat(path)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"{path} is not a private directory of this user; "
                              f"remove it or set {LOCK_DIR_ENV}")


def lock_path(pool: str) -> str:
    """The lock file of ``pool``; any pool name makes one safe file name."""
    return os.path.join(lock_dir(), f"{quote(pool, safe='')}.lock")


class LocalLock:
    """An exclusive flock on the pool's file, held until :meth:`release`."""

    def __init__(self, pool: str, *, timeout: float | None = None, nowait: bool = False) -> None:
        """Take the lock: wait for it, up to ``timeout`` seconds when given.

        Raises :class:`LockBusy` with ``nowait``, :class:`LockTimeout` when
        the timeout passes, :class:`OSError` when the file cannot be opened.
        """
        self.pool = pool
        self.path = lock_path(pool)
        # 0600: anybody who can open the file can flock it, and so stall us.
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._lock(timeout, nowait)
        except BaseException:
            self.release()
            raise

    def _lock(self, timeout: float | None, nowait: bool) -> None:
        assert self._fd is not None
        if timeout is None and not nowait:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + (timeout or 0.0)
        pause = POLL_FIRST
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if nowait:
                raise LockBusy(f"pool {self.pool!r} is busy on this host ({self.path})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"timed out after {timeout:g} s waiting for the local "
                                  f"lock of pool {self.pool!r} ({self.path})")
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX)

    def release(self) -> None:
        """Drop the lock (closing the file drops it); a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> LocalLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
