"""The local lock of ``-l``: ``flock`` on one file per pool.

An flock belongs to the open file and the kernel drops it when the process
dies, however it dies: unlike the 2014 PID file it can never go stale, and
the file is never deleted (deleting a lock file lets two processes lock two
different files of the same name).

The files are shared by every user of the host, since ``-l`` promises that
two runs on this host never overlap, whoever runs them (root's cron job and
a user's). They live, first that applies, in:

1. ``$DISTRIBUTEX_LOCK_DIR``, when set (created if missing);
2. ``/run/lock/distributex`` when ``/run/lock`` is world-writable with the
   sticky bit (Debian, Ubuntu, Fedora...);
3. ``/tmp/distributex`` otherwise.

The choice depends on the system only, never on who runs, so that all
users pick the same directory. It is created world-writable with the
sticky bit, like ``/tmp``: anybody may create a lock file, nobody may
delete or replace another user's. A lock file is created world-readable and
locked through a read-only descriptor (``flock`` needs no write access), so
any user can lock a file that another user created.

Not ``$XDG_RUNTIME_DIR`` or ``$TMPDIR``: they differ between users, and a
login session sets them when cron does not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from urllib.parse import quote

from distributex.client.errors import LockBusy, LockTimeout

LOCK_DIR_ENV = "DISTRIBUTEX_LOCK_DIR"
# Where the shared directory may be made, in order of preference: /run/lock
# is the system's place for lock files (a tmpfs, emptied at boot, which suits
# files that mean nothing after a reboot); /tmp is everywhere.
SHARED_PARENTS = ("/run/lock", "/tmp")
SHARED_NAME = "distributex"
# The shared directory: anybody may add a file (world-writable), nobody may
# remove or rename another user's (sticky), as in /tmp.
SHARED_DIR_MODE = 0o1777
# A lock file: every user must be able to open it to flock it.
LOCK_FILE_MODE = 0o644

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
    for parent in SHARED_PARENTS:
        if _is_shared(parent):
            return _shared_dir(os.path.join(parent, SHARED_NAME))
    raise PermissionError(f"none of {', '.join(SHARED_PARENTS)} is a world-writable directory "
                          f"with the sticky bit; set {LOCK_DIR_ENV}")


def _is_shared(path: str) -> bool:
    # By its mode, not by os.access(): root may write anywhere, and must
    # choose the directory every other user chooses.
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & stat.S_IWOTH) and bool(mode & stat.S_ISVTX)


def _shared_dir(path: str) -> str:
    # umask would take the world's write bit off; the wrapper has no other
    # thread yet that could create a file meanwhile.
    umask = os.umask(0)
    try:
        os.mkdir(path, SHARED_DIR_MODE)  # Linux keeps the sticky bit of mkdir's mode
    except FileExistsError:
        pass
    finally:
        os.umask(umask)
    # Anybody may have made it first, in a world-writable parent: a link
    # could lead our lock files elsewhere, and a directory without the
    # sticky bit would let anybody delete them (two runs would then lock
    # two different files of one name).
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory (a symbolic link?); remove it "
                              f"or set {LOCK_DIR_ENV}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise PermissionError(f"{path} is writable by others without the sticky bit; "
                              f"remove it or set {LOCK_DIR_ENV}")
    return path


def lock_path(pool: str) -> str:
    """The lock file of ``pool``; any pool name makes one safe file name."""
    return os.path.join(lock_dir(), f"{quote(pool, safe='')}.lock")


def open_lock_file(path: str) -> int:
    """A read-only descriptor of the lock file ``path``, created if missing.

    Opened without O_CREAT when it exists: with Linux's
    ``fs.protected_regular``, O_CREAT on another user's file in a sticky
    directory fails even when the file exists. O_NOFOLLOW: a link planted
    by somebody else is refused, not followed.
    """
    # O_NONBLOCK: opening a FIFO planted in its place must not hang (it is
    # refused below); on a regular file the flag changes nothing.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
        except FileExistsError:
            continue  # another run created it in between: open theirs
        os.fchmod(fd, LOCK_FILE_MODE)  # whatever the umask took off
        break
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return fd


class LocalLock:
    """An exclusive flock on the pool's file, held until :meth:`release`."""

    def __init__(self, pool: str, *, timeout: float | None = None, nowait: bool = False) -> None:
        """Take the lock: wait for it, up to ``timeout`` seconds when given.

        Raises :class:`LockBusy` with ``nowait``, :class:`LockTimeout` when
        the timeout passes, :class:`OSError` when the file cannot be opened.
        """
        self.pool = pool
        self.path = lock_path(pool)
        self._fd: int | None = open_lock_file(self.path)
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
