"""Where the server is: parsing ``-H``/``-p`` and ``Locker`` URLs."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

# compat: the port the 2014 server listened on and the 2014 client used.
DEFAULT_PORT = 9889

_SCHEME_PORTS = {"http": 80, "https": 443}


class ServerAddress:
    """One server: scheme, host, port, and a path prefix (behind a proxy)."""

    __slots__ = ("scheme", "host", "port", "prefix")

    def __init__(self, scheme: str, host: str, port: int, prefix: str = "") -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.prefix = prefix

    @property
    def netloc(self) -> str:
        """``host:port`` as it goes in a URL or a Host header."""
        if self.scheme == "unix":
            return "localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.host}"
        return f"{self.scheme}://{self.netloc}{self.prefix}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerAddress) and self.url == other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __repr__(self) -> str:
        return f"ServerAddress({self.url!r})"


def parse_servers(servers: str, port: int | None = None) -> list[ServerAddress]:
    """Parse ``a,b,c``: several servers of one cluster, each as
    :func:`parse_server` takes it. Raises :class:`ValueError`."""
    if not servers.strip():
        raise ValueError("the server name is empty")
    addresses = [parse_server(server, port) for server in servers.split(",")]
    if len(set(addresses)) < len(addresses):
        raise ValueError(f"{servers!r} names a server twice")
    return addresses


def parse_server(server: str, port: int | None = None) -> ServerAddress:
    """Parse a server given as a hostname, ``host:port``, an http(s) URL or
    ``unix:/path/of/socket``.

    ``port`` is the separate ``-p`` option. A bare hostname uses it, or
    :data:`DEFAULT_PORT`. A URL names its own port; a URL without one takes
    ``port`` when given, else its scheme's port (80 or 443), as any URL
    would. A URL port that contradicts ``port`` is an error, not a guess.

    Raises :class:`ValueError` with a sentence fit for the user.
    """
    server = server.strip()
    if not server:
        raise ValueError("the server name is empty")
    if server.startswith("unix:") and "://" not in server:
        path = server[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"{server!r}: a Unix socket needs an absolute path, "
                             "as in unix:/run/dx.sock")
        if "\0" in path:
            raise ValueError(f"{server!r}: a Unix socket path holds no NUL")
        return ServerAddress("unix", path, 0)
    if "://" in server:
        return _parse_url(server, port)
    if server.count(":") > 1 and not server.startswith("["):
        # A bare IPv6 literal such as ::1: its colons are not a port.
        return ServerAddress("http", server, _choose_port(None, port, DEFAULT_PORT))
    parts = _split(f"//{server}", server)
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"{server!r} is not a host name; give a URL such as http://{server}")
    return ServerAddress("http", _hostname(parts, server),
                         _choose_port(_port(parts, server), port, DEFAULT_PORT))


def _parse_url(server: str, port: int | None) -> ServerAddress:
    parts = _split(server, server)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEME_PORTS:
        raise ValueError(f"{server!r}: only http and https URLs are supported")
    if parts.query or parts.fragment:
        raise ValueError(f"{server!r}: a server URL takes no query or fragment")
    return ServerAddress(scheme, _hostname(parts, server),
                         _choose_port(_port(parts, server), port, _SCHEME_PORTS[scheme]),
                         parts.path.rstrip("/"))


def _split(text: str, server: str) -> SplitResult:
    try:
        return urlsplit(text)
    except ValueError as e:
        raise ValueError(f"{server!r} is not a valid server: {e}") from None


def _hostname(parts: SplitResult, server: str) -> str:
    if not parts.hostname:
        raise ValueError(f"{server!r} names no host")
    host = str(parts.hostname)
    if not host.isascii():
        try:  # an internationalised name goes on the wire as IDNA
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{server!r} names an invalid host") from None
    if not host.isprintable() or any(c in host for c in " /\\"):
        raise ValueError(f"{server!r} names an invalid host")
    return host


def _port(parts: SplitResult, server: str) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise ValueError(f"{server!r} has an invalid port") from None


def _choose_port(named: int | None, option: int | None, default: int) -> int:
    if named is not None and option is not None and named != option:
        raise ValueError(f"the server names port {named} but the port option says {option}")
    if named is not None:
        return named
    return option if option is not None else default
