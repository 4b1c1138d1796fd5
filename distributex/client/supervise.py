"""Running the wrapped command: its own process group, signals passed on,
and stopped (SIGTERM, a grace period, SIGKILL) when the lock is lost.

The command is the leader of a new session, so its process group holds
every process its shell starts, and a signal to the group reaches them all.
The client leaves the leader unreaped until it has finished signalling the
group: while the zombie exists its group id cannot be reused by a stranger.

PyPy 3.9 has neither ``os.posix_spawnp`` nor ``os.waitid``: there the
command is started by ``subprocess`` (its import costs a few milliseconds),
and the leader is reaped before its group gets its last signal. Linux
hands out no pid still in use as a process group id, so only an empty group
could meanwhile be reused, and an empty group needs no signal.
"""

from __future__ import annotations

import os
import signal
import threading

from distributex.client.threads import start_without_signals

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    import subprocess

# The signals a user or a service manager sends to stop or reload a job; the
# client passes them to the command rather than dying and leaving it behind.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Time for a command to clean up after SIGTERM before SIGKILL, as consul lock
# gives (lockKillGracePeriod): enough to flush and remove temporary files,
# short, because once the lock is lost another holder may already be at work.
DEFAULT_KILL_GRACE = 5.0

# Python ignores these at start; a command must get the usual defaults, or a
# pipeline such as `yes | head` would fail with EPIPE instead of ending.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Interrupted(Exception):
    """The client got a signal before the command started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class Supervisor:
    """One command run: spawned by :meth:`spawn`, awaited by :meth:`wait`.

    From :meth:`install_signal_handlers` on, SIGINT, SIGTERM and SIGHUP
    raise :class:`Interrupted` in the main thread until the command starts
    (once: cleanup is not interrupted again), and are passed to the
    command's process group after that.
    """

    def __init__(self, grace: float = DEFAULT_KILL_GRACE) -> None:
        self.grace = grace
        self.stopped = False
        self._group: int | None = None
        self._starting = False
        self._spawned = False
        self._pending: list[int] = []
        self._interrupted = False
        # Reentrant: the signal handler runs in the main thread, possibly
        # while the main thread itself holds the lock.
        self._mutex = threading.RLock()
        self._kill_timer: threading.Timer | None = None
        self._process: subprocess.Popen[bytes] | None = None  # PyPy's way of starting it

    def install_signal_handlers(self) -> None:
        for signum in FORWARDED_SIGNALS:
            # A signal ignored at our start (nohup's SIGHUP, a background
            # job's SIGINT) stays ignored, for us and for the command.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._on_signal)

    def spawn(self, argv: list[str], env: dict[str, str]) -> None:
        """Start ``argv`` as the leader of a new session, or raise OSError."""
        self._starting = True
        try:
            if hasattr(os, "posix_spawnp"):
                self._group = os.posix_spawnp(argv[0], argv, env, setsid=True,
                                              setsigdef=_RESET_SIGNALS)
            else:
                import subprocess  # PyPy 3.9 (see the module)

                # restore_signals resets SIGPIPE and SIGXFSZ, as setsigdef
                # does; descriptors are passed on as posix_spawnp passes them.
                self._process = subprocess.Popen(argv, env=env, start_new_session=True,
                                                 restore_signals=True, close_fds=False)
                self._group = self._process.pid
            self._spawned = True
        finally:
            self._starting = False
        for signum in self._pending:
            self._signal_group(signum)

    def hold_signals(self) -> None:
        """From now on a signal before the command starts is only ignored:
        the cleanup under way must not be cut short."""
        self._interrupted = True

    def stop(self) -> None:
        """SIGTERM to the command's group now, SIGKILL after the grace period.

        Safe from any thread; a second call does nothing.
        """
        with self._mutex:
            if self._group is None or self.stopped:
                return
            self.stopped = True
            self._signal_group(signal.SIGTERM)
            self._kill_timer = threading.Timer(self.grace, self._signal_group, (signal.SIGKILL,))
            self._kill_timer.daemon = True
            start_without_signals(self._kill_timer)

    def wait(self) -> int:
        """Wait for the command; its exit status, 128+N for signal N."""
        pid = self._group
        assert pid is not None, "spawn() first"
        status = None
        if hasattr(os, "waitid"):
            # Wait for the leader's end without reaping it (see the module).
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        else:
            _, status = os.waitpid(pid, 0)
        with self._mutex:
            if self.stopped:
                # The lock is gone: what the command left behind in its group
                # must not work on in the next holder's time.
                self._signal_group(signal.SIGKILL)
            self._group = None
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        if status is None:
            _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if self._process is not None:
            self._process.returncode = code  # reaped here: subprocess must not wait for it
        return 128 - code if code < 0 else code

    def _signal_group(self, signum: int) -> None:
        with self._mutex:
            if self._group is None:
                return
            try:
                os.killpg(self._group, signum)
            except ProcessLookupError:
                pass  # the whole group has ended already

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._group is not None:
            self._signal_group(signum)
        elif self._starting:
            self._pending.append(signum)
        elif not self._spawned and not self._interrupted:
            self._interrupted = True
            raise Interrupted(signum)
