"""``distributexctl``: the operator's command (contract section 5).

    distributexctl -H SERVER status [POOL...] [--json]
    distributexctl -H SERVER follow [POOL...]
    distributexctl -H SERVER reset POOL [--host H [--session S]]

Standard library only (http.client), like the wrapper: it runs from a
shell on any machine of the cluster.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import ssl
import sys
import time
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Tuple
from urllib.parse import urlencode

from distributex import __version__
from distributex.client.address import ServerAddress, parse_server

PROG = "distributexctl"
#: A status or reset is one short request: a server that does not answer
#: within this is reported, not waited for.
REQUEST_TIMEOUT = 10.0
#: follow reconnects after a lost stream with these pauses (a restarting
#: server listens again within a second or two).
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 10.0
#: The stream sends a comment every 15 s; silence much longer than that
#: means the connection is dead.
FOLLOW_READ_TIMEOUT = 60.0
AUTH_FILE_ENV = "DISTRIBUTEX_AUTH_FILE"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """\
examples:
  distributexctl -H dx.example.com status                  # every pool: holders, queues
  distributexctl -H dx.example.com status backup --json    # one pool, as JSON
  distributexctl -H dx.example.com follow                  # one line per event, live
  distributexctl -H dx.example.com follow backup deploy    # only these pools
  distributexctl -H dx.example.com reset backup --host web3   # force-release web3's hold
  distributexctl -H dx.example.com reset backup            # end every hold, drop the queue

follow reconnects by itself when the server restarts, and resumes where it
left off when the server still has the events. reset needs the admin role:
the secret comes from --auth-file or $DISTRIBUTEX_AUTH_FILE (without access
control on the server, reset is allowed from the server's own machine).

exit status: 0 done, 1 the server refused or could not be reached, 2 usage.
"""


class CtlError(Exception):
    """One line for stderr: the command failed."""


def main(argv: Optional[List[str]] = None) -> NoReturn:
    """The console entry point."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: List[str]) -> int:
    options = parse_args(argv)
    try:
        client = Client(options.address, _secret(options.auth_file))
        if options.command == "status":
            return status(client, options.pools, options.json)
        if options.command == "follow":
            return follow(client, options.pools)
        return reset(client, options.pool, options.host, options.session)
    except CtlError as error:
        sys.stderr.write(f"{PROG}: {error}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Look at and manage the pools of a distributex server.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-H", "--server", required=True, metavar="SERVER",
                        help="the server: a host name or an http[s]://host:port URL")
    parser.add_argument("-p", "--port", type=_port, metavar="PORT", help="the server's port (default 9889)")
    parser.add_argument("--auth-file", metavar="FILE", default=os.environ.get(AUTH_FILE_ENV),
                        help=f"the access secret, sent as a bearer token (also ${AUTH_FILE_ENV})")
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("status", help="holders and queues of every pool, or of the named ones")
    p.add_argument("pools", nargs="*", metavar="POOL")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p = commands.add_parser("follow", help="print one line per pool event as it happens")
    p.add_argument("pools", nargs="*", metavar="POOL")
    p = commands.add_parser("reset", help="force-release a hold, or every hold and waiter of a pool")
    p.add_argument("pool", metavar="POOL")
    p.add_argument("--host", help="end only this host's holds")
    p.add_argument("--session", help="end only this session of --host")
    return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        options.address = parse_server(options.server, options.port)
    except ValueError as error:
        parser.error(str(error))
    if getattr(options, "session", None) and not options.host:
        parser.error("--session needs --host")
    return options


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _secret(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as error:
        raise CtlError(f"cannot read the auth file {path}: {error.strerror}") from None


class Client:
    """Requests to one server with http.client."""

    def __init__(self, address: ServerAddress, secret: Optional[str]) -> None:
        self.address = address
        self.secret = secret

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        a = self.address
        if a.scheme == "https":
            return http.client.HTTPSConnection(a.host, a.port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(a.host, a.port, timeout=timeout)

    def headers(self, **extra: str) -> Dict[str, str]:
        headers = {"User-Agent": f"{PROG}/{__version__}", **extra}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        return headers

    def call(self, method: str, path: str, params: List[Tuple[str, str]]) -> Tuple[int, Dict[str, Any]]:
        """One request answered in JSON: (status, the object)."""
        query = urlencode(params + [("format", "json")])
        conn = self.connection(REQUEST_TIMEOUT)
        try:
            if method == "POST":
                conn.request("POST", f"{self.address.prefix}{path}", body=query,
                             headers=self.headers(**{"Content-Type": "application/x-www-form-urlencoded"}))
            else:
                conn.request("GET", f"{self.address.prefix}{path}?{query}", headers=self.headers())
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise CtlError(f"cannot reach {self.address.url}: {error or type(error).__name__}") from None
        finally:
            conn.close()
        try:
            data = json.loads(body)
        except ValueError:
            raise CtlError(f"{self.address.url} answered HTTP {response.status} that is not distributex's "
                           f"JSON: {body[:80]!r}") from None
        if response.status >= 400:
            raise CtlError(f"{self.address.url} refused (HTTP {response.status}): "
                           f"{data.get('reason', data.get('result'))}")
        return response.status, data


# -- status ---------------------------------------------------------------------------


def status(client: Client, pools: List[str], as_json: bool) -> int:
    _, data = client.call("GET", "/status/", [("pool", p) for p in pools])
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(render_status(data))
    return EXIT_OK


def render_status(data: Dict[str, Any]) -> str:
    rows = [("POOL", "SLOTS", "STATE", "HOST", "SESSION", "TOKEN", "FOR", "EXPIRES IN", "LABEL")]
    for pool in data["pools"]:
        first = True
        slots = f"{len(pool['holders'])}/{pool['maxlocks']}"

        def lead() -> Tuple[str, str]:
            return (pool["name"], slots) if first else ("", "")

        for h in pool["holders"]:
            expires = "never" if h["expires_in"] is None else duration(h["expires_in"])
            rows.append((*lead(), "held", h["host"], h["session"] or "", str(h["token"]),
                         duration(h["held_for"]), expires, h["label"]))
            first = False
        for w in pool["waiters"]:
            rows.append((*lead(), f"wait {w['position']}", w["host"], w["session"] or "", "",
                         duration(w["waited_for"]), "", w["label"]))
            first = False
        if pool.get("lock_delay"):
            until = time.strftime("%H:%M:%S", time.localtime(pool["lock_delay"]["until"]))
            rows.append((*lead(), "lock-delay", "", "", "", f"until {until}",
                         duration(pool["lock_delay"]["remaining"]), ""))
            first = False
        if first:
            rows.append((pool["name"], slots, "free", "", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# -- follow ---------------------------------------------------------------------------


def follow(client: Client, pools: List[str]) -> int:
    """Print events until interrupted, reconnecting (and resuming) as needed."""
    last_id: Optional[str] = None
    pause = RECONNECT_FIRST
    said_lost = False
    while True:
        try:
            for event_id, kind, data in stream(client, pools, last_id):
                if said_lost:
                    sys.stderr.write(f"{PROG}: reconnected to {client.address.url}\n")
                    said_lost = False
                pause = RECONNECT_FIRST
                if event_id is not None:
                    last_id = event_id
                line = describe_event(kind, data)
                if line:
                    print(line, flush=True)
        except (OSError, http.client.HTTPException, CtlError) as error:
            if not said_lost:
                sys.stderr.write(f"{PROG}: lost {client.address.url} ({error or type(error).__name__}); "
                                 f"reconnecting\n")
                said_lost = True
        time.sleep(pause)
        pause = min(pause * 2, RECONNECT_MAX)


def stream(client: Client, pools: List[str], last_id: Optional[str]) -> Iterator[Tuple[Optional[str], str, Any]]:
    """The events of one connection: (id, kind, data)."""
    conn = client.connection(FOLLOW_READ_TIMEOUT)
    headers = client.headers(Accept="text/event-stream")
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    conn.request("GET", f"{client.address.prefix}/events/?{urlencode([('pool', p) for p in pools])}",
                 headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise CtlError(f"{client.address.url} refused the event stream (HTTP {response.status}): "
                       f"{response.getheader('X-Distributex-Reason', '')}")
    fields: Dict[str, str] = {}
    try:
        while True:
            line = response.readline()
            if not line:
                raise CtlError("the stream ended")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text:
                if not text.startswith(":"):
                    name, _, value = text.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
                continue
            if "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
            fields = {}
    finally:
        conn.close()


def describe_event(kind: str, data: Dict[str, Any]) -> str:
    """One line per event, like ``turn follow``: time, kind, pool, who."""
    if kind in ("gap", "dropped", "shutdown"):
        return f"-- {kind}: {data.get('reason', '')}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data["at"]))
    who = data["host"] + (f" ({data['session']})" if data.get("session") else "")
    token = f" token={data['token']}" if data.get("token") else ""
    label = f" label={data['label']!r}" if data.get("label") else ""
    return f"{when} {kind:<8} {data['pool']} {who}{token}{label}".rstrip()


# -- reset ----------------------------------------------------------------------------


def reset(client: Client, pool: str, host: Optional[str], session: Optional[str]) -> int:
    params = [("pool", pool)]
    if host:
        params.append(("host", host))
    if session:
        params.append(("session", session))
    _, data = client.call("POST", "/reset/", params)
    ended = ", ".join(f"{h['host']}" + (f" ({h['session']})" if h.get("session") else "") + f" token {h['token']}"
                      for h in data["ended"]) or "no hold"
    print(f"pool {pool}: ended {ended}; {data['dropped_waiters']} waiter(s) answered NO")
    return EXIT_OK


if __name__ == "__main__":
    main()
