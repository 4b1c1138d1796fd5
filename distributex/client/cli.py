"""The ``distributex`` command: run a command while holding a distributex lock.

Its start-up is paid by every cron run, so this path imports the standard
library only (no Twisted, no treq) and as little of it as will do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from distributex import __version__
from distributex.client.address import DEFAULT_PORT, parse_servers
from distributex.client.errors import DistributexError, LockBusy, LockTimeout
from distributex.client.supervise import DEFAULT_KILL_GRACE, Interrupted, Supervisor

TYPE_CHECKING = False  # importing typing would slow the wrapper's start; mypy sees True.
if TYPE_CHECKING:
    import ssl
    from typing import NoReturn

    from distributex.client.locallock import LocalLock
    from distributex.client.locker import HeldLock, Locker

AUTH_FILE_ENV = "DISTRIBUTEX_AUTH_FILE"

# compat: the 2014 client exited 1 whenever it did not run the command.
DEFAULT_CONFLICT_EXIT = 1
# The shell's statuses for a command that cannot be run, so that `-- ARGV`
# fails the way `'command'` through /bin/sh does.
CANNOT_EXECUTE_EXIT = 126
NOT_FOUND_EXIT = 127

PROG = "distributex"

DESCRIPTION = """\
Run a command while holding a lock of a distributex server, so that only
one host of a cluster (or maxlocks of them) runs it at a time. The lease is
renewed while the command runs; if the lock is lost anyway the command gets
SIGTERM, then SIGKILL after the grace period.
"""

EPILOG = f"""\
The command runs through /bin/sh -c (or as ARGV after --) in its own process
group, with DISTRIBUTEX_POOL, DISTRIBUTEX_HOST, DISTRIBUTEX_SESSION (the
random session of this run: the holder is the host and the session, so two
runs on one host exclude each other) and DISTRIBUTEX_TOKEN (the fencing token
of the grant) in its environment. SIGINT, SIGTERM and SIGHUP are passed on
to it.

exit status:
  the command's own, 128+N when signal N ended it;
  the conflict status (-E, default {DEFAULT_CONFLICT_EXIT}) when the lock was not obtained
  (busy with -n, -t passed, server unreachable, INVALID, ERROR): the command
  did not run;
  2 for a usage error.

crontab example: puppet on one host of the cluster at a time, skipping the
round (quietly, exit status 75) while another host is still at it:

  */5 * * * * distributex -H dx.example.com -r puppet -l -n -E 75 'puppet agent --onetime --no-daemonize'
"""  # noqa: E501  (a crontab line is one line)


def main(argv: list[str] | None = None) -> NoReturn:
    """The console entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
    """Run the wrapper with command-line ``argv``; its exit status."""
    options = parse_args(argv)
    supervisor = Supervisor(grace=options.grace)
    supervisor.install_signal_handlers()
    local: LocalLock | None = None
    locker: Locker | None = None
    held: HeldLock | None = None
    try:
        if options.local:
            from distributex.client.locallock import LocalLock

            local = LocalLock(options.pool, timeout=options.timeout, nowait=options.nowait)
        env = dict(os.environ, DISTRIBUTEX_POOL=options.pool)
        if options.addresses is not None:
            from distributex.client.locker import Locker

            locker = Locker(options.addresses, host=options.id, secret=options.secret,
                            ssl_context=options.ssl_context)
            held = _lock_server(options, locker)
            env.update(DISTRIBUTEX_HOST=held.host, DISTRIBUTEX_SESSION=held.session,
                       DISTRIBUTEX_TOKEN=str(held.token))
        return _run_command(options, supervisor, env, held)
    except LockBusy:
        return options.conflict_exit  # -n found it busy: skip this round quietly
    except DistributexError as error:
        _say(str(error))
        return options.conflict_exit
    except Interrupted as interruption:
        return 128 + interruption.signum
    except OSError as error:  # the local lock's directory or file
        _say(f"local lock of pool {options.pool!r}: {error}")
        return options.conflict_exit
    finally:
        supervisor.hold_signals()
        if held is not None:
            _release(held)
        if locker is not None:
            # A signal between the grant and `held = ...` above left a lock
            # that only the locker knows of: it must not outlive this run.
            locker.release_all()
        if local is not None:
            local.release()


def _lock_server(options: argparse.Namespace, locker: Locker) -> HeldLock:
    timeout = options.timeout
    if timeout is not None and options.local:
        # The local lock, taken first, has used part of the time.
        timeout = max(0.0, options.deadline - time.monotonic())
    try:
        return locker.acquire(options.pool, label=options.label, timeout=timeout,
                              nowait=options.nowait)
    except LockTimeout as error:
        # Say the -t the user gave, not what the local lock left of it.
        _, paren, failure = str(error).partition(" (last error: ")
        raise LockTimeout(f"timed out after {options.timeout:g} s waiting for pool "
                          f"{options.pool!r}{paren}{failure}") from None


def _run_command(options: argparse.Namespace, supervisor: Supervisor, env: dict[str, str],
                 held: HeldLock | None) -> int:
    argv = options.argv or ["/bin/sh", "-c", options.command]
    try:
        supervisor.spawn(argv, env)
    except OSError as error:
        _say(f"cannot run {argv[0]}: {error.strerror or error}")
        return NOT_FOUND_EXIT if isinstance(error, FileNotFoundError) else CANNOT_EXECUTE_EXIT
    if held is not None:
        def lost(reason: str) -> None:
            _say(f"lost the lock on pool {options.pool!r}: {reason}; stopping the command "
                 f"(SIGTERM, SIGKILL after {options.grace:g} s)")
            supervisor.stop()

        held.on_lost(lost)
    return supervisor.wait()


def _release(held: HeldLock) -> None:
    try:
        held.release()
    except DistributexError as error:
        if not held.lost.is_set():  # a lost lock has said so already
            _say(f"could not release the lock on pool {held.pool!r} (its lease of "
                 f"{held.expire:g} s will run out): {error}")


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        usage="%(prog)s [-H SERVER] -r POOL [options] ('command' | -- ARGV...)",
        formatter_class=_Formatter)
    add = parser.add_argument
    add("command", nargs="?", help="the command, one string run by /bin/sh -c")
    add("-H", "--server", metavar="SERVER", action=_Once,
        help="the server: a host name, an http[s]://host:port URL or "
             "unix:/path/of/socket; several servers of one cluster as a,b,c (the "
             "next is tried when one cannot be reached); without it the command "
             "runs under the local lock alone")
    add("-r", "--pool", required=True, metavar="POOL", help="the pool to lock")
    add("-p", "--port", type=_port, metavar="PORT",
        help=f"the server's port (default {DEFAULT_PORT})")
    add("-l", "--local", action="store_true",
        help="also take a local lock (flock on a per-pool file shared by every "
             "user), so that two runs on this host never overlap, whoever runs them")
    add("-t", "--timeout", type=_seconds, metavar="SECONDS",
        help="give up waiting for the lock after this long")
    add("-n", "--nowait", action="store_true",
        help="try once; if the lock is busy, do not run the command")
    add("-E", "--conflict-exit-code", dest="conflict_exit", type=_status,
        default=DEFAULT_CONFLICT_EXIT, metavar="N",
        help=f"exit status when the lock was not obtained (default {DEFAULT_CONFLICT_EXIT})")
    add("--id", metavar="NAME",
        help="the holder identity sent to the server (default: this host's FQDN)")
    add("--label", metavar="TEXT", help="a label shown beside the holder in /status/")
    add("-g", "--grace", type=_seconds, default=DEFAULT_KILL_GRACE, metavar="SECONDS",
        help="after a lost lock, SIGKILL the command this long after SIGTERM "
             f"(default {DEFAULT_KILL_GRACE:g})")
    add("--auth-file", metavar="FILE", default=os.environ.get(AUTH_FILE_ENV) or None,
        help=f"a file holding the access secret, sent as a bearer token (default "
             f"${AUTH_FILE_ENV})")
    add("--cacert", metavar="FILE",
        help="verify an https server against the CA certificates of FILE "
             "(default: the system's store)")
    add("--cert", metavar="FILE", help="a client certificate (PEM) for https")
    add("--key", metavar="FILE", help="the private key of --cert (default: in --cert)")
    add("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line (cron mails it), not argparse's usage line and the error.
        message = " ".join(message.split())  # an argument's newline stays on the line
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    # argparse builds a formatter for every option it adds, and by default
    # measures the terminal with shutil, whose import alone costs the
    # wrapper's start several milliseconds; os does the same for free.
    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            width = 80
        super().__init__(prog, width=max(width - 2, 40))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; a usage error exits with status 2."""
    parser = build_parser()
    # Everything after the first `--` is the command's own argument vector;
    # split by hand, because argparse would mix it with the positional.
    if "--" in argv:
        split = argv.index("--")
        argv, command_argv = argv[:split], argv[split + 1:]
    else:
        command_argv = None
    options = parser.parse_args(argv)
    options.argv = command_argv
    if command_argv is not None and options.command is not None:
        parser.error("give the command as one string or as ARGV after --, not both")
    if command_argv == [] or (command_argv is None and not options.command):
        parser.error("no command given")
    for option, value in (("-r", options.pool), ("--id", options.id),
                          ("--label", options.label)):
        if value is not None and not _sendable(value):
            parser.error(f"{option} {value!r} is not valid text (UTF-8, no NUL)")
    if options.server is None and options.port is not None:
        parser.error("-p needs -H")
    options.addresses = None
    options.secret = None
    options.ssl_context = None
    if options.server is not None:
        try:
            options.addresses = parse_servers(options.server, options.port)
        except ValueError as error:
            parser.error(str(error))
    else:
        options.local = True  # without a server the local lock is the lock
    if options.key is not None and options.cert is None:
        parser.error("--key needs --cert")
    if options.server is None and (options.cacert or options.cert):
        parser.error("--cacert and --cert need -H")
    if options.auth_file and options.addresses is not None:
        options.secret = _read_secret(parser, options.auth_file)
    if options.addresses is not None and (options.cacert or options.cert):
        if not any(address.scheme == "https" for address in options.addresses):
            parser.error("--cacert and --cert need an https:// server")
        options.ssl_context = _ssl_context(parser, options)
    if options.timeout is not None:
        options.deadline = time.monotonic() + options.timeout
    return options


class _Once(argparse.Action):
    """An option that may be given once: a second -H is a mistake, not a
    change of mind (take several servers as a,b,c)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; give several servers as -H a,b,c")
        setattr(namespace, self.dest, values)


def _sendable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, as surrogate escapes
        return False
    return "\0" not in text


def _read_secret(parser: argparse.ArgumentParser, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path, not UTF-8
        reason = getattr(error, "strerror", None) or str(error)
        parser.error(f"cannot read the auth file {path!r}: {reason}")
    if not secret or any(c in secret for c in "\r\n\0") or not secret.isprintable():
        parser.error(f"the auth file {path!r} holds no single-line secret")
    return secret


def _ssl_context(parser: argparse.ArgumentParser, options: argparse.Namespace) -> ssl.SSLContext:
    import ssl  # only https users pay for it

    try:
        context = ssl.create_default_context(cafile=options.cacert)
        if options.cert is not None:
            context.load_cert_chain(options.cert, options.key)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        what = f"--cacert {options.cacert}" if options.cacert else ""
        if options.cert:
            what = f"{what} --cert {options.cert}".strip()
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
        parser.error(f"cannot load {what}: {reason}")
    return context


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _status(text: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise argparse.ArgumentTypeError(f"not an exit status (0-255): {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
