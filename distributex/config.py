"""Loading and validating distributex.yaml.

Every mistake becomes one ConfigError whose message names the file, the key
(or line) and what is wrong: a typo must stop the server, never silently
disable a lock.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import yaml

from distributex.access import ROLES, AccessEntry, AccessError, AccessList, read_secret
from distributex.channel import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, DEFAULT_RESERVED_FDS

from distributex.catalog import (  # noqa: F401  (PoolSpec and the defaults are part of this module's API)
    DEFAULT_EXPIRE,
    DEFAULT_MAX_WAITERS,
    DEFAULT_MAXLOCKS,
    Catalog,
    PatternError,
    PoolPattern,
    PoolSpec,
    check_pattern,
    overlap,
)

DEFAULT_PORT = 9889
DEFAULT_MEMCACHE_HOST = "localhost"
DEFAULT_MEMCACHE_PORT = 11211
#: How often a server re-reads the pools in which it has local waiters when
#: the memcache backend is used: 50 ms keeps a cross-server handoff under the
#: 100 ms p99 target while costing each such pool only 20 gets a second.
DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_NAMESPACE = "distributex"
#: etcd's own default client address.
DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"
#: Beside twistd.pid in the working directory: a restart from the same
#: place finds its holds again (contract guarantee 6).
DEFAULT_STATE_FILE = "distributex.state"

NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
BACKENDS = ("inmemory", "memcache", "etcd")

TOP_KEYS = {
    "backend", "memcachehost", "memcacheport", "memcache_servers",
    "poll_interval", "namespace", "pools", "state_file", "state_fsync",
    "max_connections_per_client", "reserved_fds", "access",
    "etcd_endpoints", "etcd_cacert", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file",
    "tls_client_ca",
}
ACCESS_KEYS = {"name", "secret_file", "role", "pools"}
POOL_KEYS = {"name", "pattern", "expire", "maxlocks", "servers", "max_waiters"}


class ConfigError(Exception):
    """The configuration cannot be used; str() is the one line to print."""


@dataclass(frozen=True)
class Config:
    pools: Catalog = field(default_factory=Catalog)
    backend: str = "inmemory"
    memcache_servers: tuple = ((DEFAULT_MEMCACHE_HOST, DEFAULT_MEMCACHE_PORT),)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    namespace: str = DEFAULT_NAMESPACE
    state_file: Optional[str] = DEFAULT_STATE_FILE  # None: keep nothing across restarts
    state_fsync: bool = False
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    reserved_fds: int = DEFAULT_RESERVED_FDS
    access: AccessList = field(default_factory=lambda: AccessList(()))
    etcd_endpoints: Tuple[str, ...] = (DEFAULT_ETCD_ENDPOINT,)
    etcd_cacert: Optional[str] = None  # TLS to etcd: the CA that signed its certificates
    etcd_cert: Optional[str] = None  # and this server's client certificate and key
    etcd_key: Optional[str] = None
    etcd_user: Optional[str] = None  # etcd authentication (the password from a file)
    etcd_password_file: Optional[str] = None
    # ssl: listeners then require a client certificate signed by this CA.
    tls_client_ca: Optional[str] = None
    source: str = "<config>"


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A YAML loader that refuses a key given twice in one mapping; libyaml's
    parser where PyYAML has it (a file of 100,000 pools loads in a second,
    not ten)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}YAML error: {problem}") from None
    return _build(data, source)


def _fail(source: str, key: str, what: str) -> None:
    raise ConfigError(f"{source}: {key}: {what}")


def _number(source: str, key: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, key, f"must be a number, not {value!r}")
    if not math.isfinite(value) or value < minimum:
        _fail(source, key, f"must be a finite number >= {minimum:g}, not {value!r}")
    return float(value)


def _integer(source: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(source, key, f"must be a whole number, not {value!r}")
    if value < minimum:
        _fail(source, key, f"must be at least {minimum}, not {value!r}")
    return value


def _name(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        _fail(source, key, f"must match [A-Za-z0-9_.:-]{{1,128}}, not {value!r}")
    return value


def _host_port(source: str, key: str, value: Any) -> tuple:
    if not isinstance(value, str) or not value.strip():
        _fail(source, key, f"must be 'host:port', not {value!r}")
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        return (port, DEFAULT_MEMCACHE_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        _fail(source, key, f"must be 'host:port', not {value!r}")
    return (host.strip("[]"), int(port))


def _servers(source: str, key: str, value: Any) -> Optional[frozenset]:
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        _fail(source, key, "must be a comma-separated string or a list of host names")
    hosts = frozenset(h.strip() for h in items if h.strip())
    if not hosts:
        _fail(source, key, "names no host (leave it out to allow any host)")
    return hosts


def _pool(source: str, index: int, item: Any) -> Union[PoolSpec, PoolPattern]:
    """One entry of pools: a named pool, or a pattern of pools made on demand."""
    where = f"pools[{index}]"
    if not isinstance(item, dict):
        _fail(source, where, "must be a mapping with a name (or a pattern)")
    unknown = sorted(set(map(str, item)) - POOL_KEYS)
    if unknown:
        _fail(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(POOL_KEYS))})")
    if ("name" in item) == ("pattern" in item):
        _fail(source, where, "give either 'name' (one pool) or 'pattern' (pools on demand)")
    if "name" in item:
        name = _name(source, f"{where}.name", item["name"])
        where = f"pool {name!r}"
    else:
        name = item["pattern"]
        if not isinstance(name, str):
            _fail(source, f"{where}.pattern", f"must be a string, not {name!r}")
        try:
            check_pattern(name)
        except PatternError as e:
            _fail(source, f"{where}.pattern", f"{name!r} {e}")
        where = f"pattern {name!r}"
    expire = item.get("expire", DEFAULT_EXPIRE)
    spec = PoolSpec(
        name=name,
        expire=DEFAULT_EXPIRE if expire is None else _number(source, f"{where}: expire", expire),
        maxlocks=_integer(source, f"{where}: maxlocks", item.get("maxlocks", DEFAULT_MAXLOCKS), 1),
        servers=_servers(source, f"{where}: servers", item.get("servers")),
        max_waiters=_integer(source, f"{where}: max_waiters", item.get("max_waiters", DEFAULT_MAX_WAITERS), 1),
    )
    return spec if "name" in item else PoolPattern(name, spec)


def _catalog(source: str, raw_pools: Any) -> Catalog:
    if not isinstance(raw_pools, list):
        _fail(source, "pools", "must be a list of pools")
    named: Dict[str, PoolSpec] = {}
    patterns: List[PoolPattern] = []
    for index, item in enumerate(raw_pools):
        entry = _pool(source, index, item)
        if isinstance(entry, PoolSpec):
            if entry.name in named:
                _fail(source, f"pools[{index}].name", f"duplicate pool {entry.name!r}")
            named[entry.name] = entry
            continue
        for other in patterns:
            both = overlap(entry.pattern, other.pattern)
            if both is not None:
                _fail(source, f"pools[{index}].pattern",
                      f"{entry.pattern!r} overlaps {other.pattern!r} (both match {both!r}): "
                      f"which settings a pool gets must not depend on the order of the file")
        patterns.append(entry)
    if not named and not patterns:
        _fail(source, "pools", "no pool and no pattern: this server could grant nothing "
                               "(add a pool, e.g. pools: [{name: pool1}])")
    return Catalog(named, patterns)


def _access(source: str, raw: Any) -> AccessList:
    """The access entries, their secrets read now (a reload reads them again)."""
    if raw is None:
        return AccessList(())
    if not isinstance(raw, list) or not raw:
        _fail(source, "access", "must be a non-empty list of {name, secret_file, role[, pools]}")
    entries: List[AccessEntry] = []
    for index, item in enumerate(raw):
        where = f"access[{index}]"
        if not isinstance(item, dict):
            _fail(source, where, "must be a mapping with name, secret_file and role")
        unknown = sorted(set(map(str, item)) - ACCESS_KEYS)
        if unknown:
            _fail(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(ACCESS_KEYS))})")
        for key in ("name", "secret_file", "role"):
            if key not in item:
                _fail(source, where, f"missing required key {key!r}")
        name = _name(source, f"{where}.name", item["name"])
        if any(e.name == name for e in entries):
            _fail(source, f"{where}.name", f"duplicate access name {name!r}")
        role = item["role"]
        if role not in ROLES:
            _fail(source, f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        pools = item.get("pools")
        if pools is not None:
            if role != "client":
                _fail(source, f"{where}.pools", "only a client entry is limited to pools (admin may do everything)")
            if isinstance(pools, str):
                pools = [pools]
            if not isinstance(pools, list) or not pools or not all(isinstance(p, str) and p for p in pools):
                _fail(source, f"{where}.pools", "must be a list of pool names or fnmatch patterns")
        path = item["secret_file"]
        if not isinstance(path, str) or not path:
            _fail(source, f"{where}.secret_file", f"must be a file name, not {path!r}")
        try:
            secret = read_secret(path)
        except AccessError as e:
            _fail(source, f"{where}.secret_file", str(e))
        if any(e.secret == secret for e in entries):
            _fail(source, f"{where}.secret_file", "holds the same secret as another entry: give each its own")
        entries.append(AccessEntry(name, role, None if pools is None else tuple(pools), secret))
    return AccessList(entries)


def _endpoint_problem(endpoint: str) -> Optional[str]:
    """What is wrong with an etcd endpoint (an http[s]://host:port URL), or None."""
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or url.path.rstrip("/") or url.query or url.fragment \
            or any(c.isspace() for c in endpoint):
        return "is not an http[s]://host:port URL"
    try:
        url.port
    except ValueError:
        return "the port must be a number from 0 to 65535"
    host = url.hostname
    if not host:
        return "names no host"
    if ":" not in host:  # an IPv6 address is not a name
        try:
            host.encode("idna")
        except UnicodeError:
            return "is not a valid host name"
    return None


def _etcd(source: str, data: Dict[str, Any], backend: str) -> Dict[str, Any]:
    """The etcd_* keys, checked; only with backend: etcd."""
    given = sorted(k for k in data if k.startswith("etcd_"))
    if given and backend != "etcd":
        _fail(source, given[0], "only the etcd backend uses it (backend: etcd)")
    out: Dict[str, Any] = {}
    if "etcd_endpoints" in data:
        endpoints = data["etcd_endpoints"]
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",")]
        if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
            _fail(source, "etcd_endpoints", "must be a non-empty list of http[s]://host:port URLs")
        for endpoint in endpoints:
            problem = _endpoint_problem(endpoint)
            if problem:
                _fail(source, "etcd_endpoints", f"{endpoint!r}: {problem}")
        out["etcd_endpoints"] = tuple(e.rstrip("/") for e in endpoints)
    for key in ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file"):
        if key in data:
            value = data[key]
            if not isinstance(value, str) or not value:
                _fail(source, key, f"must be a string, not {value!r}")
            out[key] = value
    if ("etcd_cert" in out) != ("etcd_key" in out):
        _fail(source, "etcd_cert", "etcd_cert and etcd_key go together")
    if ("etcd_user" in out) != ("etcd_password_file" in out):
        _fail(source, "etcd_user", "etcd_user and etcd_password_file go together")
    return out


def _build(data: Any, source: str) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(source, "top level", "must be a mapping of keys such as 'pools'")
    unknown = sorted(set(map(str, data)) - TOP_KEYS)
    if unknown:
        _fail(source, unknown[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")

    backend = data.get("backend", "inmemory")
    if backend not in BACKENDS:
        _fail(source, "backend", f"must be one of {', '.join(BACKENDS)}, not {backend!r}")

    if "memcache_servers" in data:
        if "memcachehost" in data or "memcacheport" in data:
            _fail(source, "memcache_servers", "give either memcache_servers or memcachehost/memcacheport, not both")
        listed = data["memcache_servers"]
        if not isinstance(listed, list) or not listed:
            _fail(source, "memcache_servers", "must be a non-empty list of 'host:port'")
        servers = tuple(_host_port(source, "memcache_servers", v) for v in listed)
    else:
        host = data.get("memcachehost", DEFAULT_MEMCACHE_HOST)
        if not isinstance(host, str) or not host:
            _fail(source, "memcachehost", f"must be a host name, not {host!r}")
        port = _integer(source, "memcacheport", data.get("memcacheport", DEFAULT_MEMCACHE_PORT), 1)
        if port > 65535:
            _fail(source, "memcacheport", f"must be a TCP port, not {port}")
        servers = ((host, port),)

    poll = data.get("poll_interval", DEFAULT_POLL_INTERVAL)
    poll = _number(source, "poll_interval", poll, 0.001)
    namespace = _name(source, "namespace", data.get("namespace", DEFAULT_NAMESPACE))

    pools = _catalog(source, data.get("pools") or [])

    state_file = data.get("state_file", DEFAULT_STATE_FILE)
    if state_file is not None and (not isinstance(state_file, str) or not state_file.strip()):
        _fail(source, "state_file", f"must be a file name, or null to keep nothing, not {state_file!r}")
    if backend != "inmemory" and "state_file" in data:
        _fail(source, "state_file", f"only the inmemory backend keeps a state file ({backend} keeps its "
                                    f"state in its store)")
    state_fsync = data.get("state_fsync", False)
    if not isinstance(state_fsync, bool):
        _fail(source, "state_fsync", f"must be true or false, not {state_fsync!r}")

    etcd = _etcd(source, data, backend)
    client_ca = data.get("tls_client_ca")
    if client_ca is not None and (not isinstance(client_ca, str) or not os.path.isfile(client_ca)):
        _fail(source, "tls_client_ca", f"must name a PEM file of CA certificates, not {client_ca!r}")
    per_client = _integer(source, "max_connections_per_client",
                          data.get("max_connections_per_client", DEFAULT_MAX_CONNECTIONS_PER_CLIENT), 1)
    reserved = _integer(source, "reserved_fds", data.get("reserved_fds", DEFAULT_RESERVED_FDS), 0)

    return Config(pools=pools, backend=backend, memcache_servers=servers,
                  poll_interval=poll, namespace=namespace, source=source,
                  state_file=state_file if backend == "inmemory" else None, state_fsync=state_fsync,
                  max_connections_per_client=per_client, reserved_fds=reserved,
                  access=_access(source, data.get("access")), tls_client_ca=client_ca, **etcd)
