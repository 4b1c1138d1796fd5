"""Contract section 6, audit: every grant, release, expiry and reset is
logged with the client address, and no request value can forge a log line."""

import json
import re
import time

import pytest
from contract_helpers import get, release
from servers import http, wait_until

pytestmark = pytest.mark.timeout(60)

POOLS = [{"name": "pool1", "expire": 300}, {"name": "short", "expire": 0.3}]


def event_lines(server):
    return [line for line in server.log().splitlines() if "pool=" in line and "distributex.pool" in line
            or line.startswith("\tpool=")]


def test_grants_releases_expiries_and_resets_name_the_client_address(start_server, backend):
    server = start_server(POOLS, backend=backend)
    get(server, "web3")
    release(server, "web3")
    get(server, "web4", pool="short")
    get(server, "web5")
    http(f"{server.url}/reset/", method="POST", data=b"pool=pool1")
    time.sleep(0.5)
    get(server, "web6", pool="short")  # a shared backend ends a lease when the pool is next touched
    wait_until(lambda: "expired host=web4" in server.log(), timeout=10)
    wait_until(lambda: "reset host=web5" in server.log(), timeout=10)
    log = server.log()
    for needle in ("granted host=web3", "released host=web3", "expired host=web4", "reset host=web5"):
        (line,) = [line for line in log.splitlines() if needle in line]
        assert line.rstrip().endswith("by=127.0.0.1"), line


@pytest.mark.parametrize("host", ["a\u2028pool=pool1 released host=victim", "b\u0085x", "c token=1",
                                  'd" by=10.0.0.1', "e\u200bf"])
def test_no_host_value_can_forge_a_log_line_or_field(start_server, host):
    server = start_server(POOLS)
    assert get(server, host).body == b"YES"
    wait_until(lambda: "granted" in server.log(), timeout=5)
    (line,) = [line for line in server.log().splitlines() if "granted" in line]
    # One ASCII line whose fields parse back to exactly what was asked.
    assert line.isascii()
    fields = parse_fields(line)
    assert [k for k, _ in fields] == ["pool", "host", "token", "by"]
    assert dict(fields)["host"] == host and dict(fields)["by"] == "127.0.0.1"
    assert "\u2028" not in server.log() and "\u0085" not in server.log()


def test_a_label_cannot_forge_a_field_either(start_server):
    server = start_server(POOLS)
    get(server, "web3", label='x" by=10.9.9.9 host="victim')
    wait_until(lambda: "granted" in server.log(), timeout=5)
    (line,) = [line for line in server.log().splitlines() if "granted" in line]
    fields = dict(parse_fields(line))
    assert fields["label"] == 'x" by=10.9.9.9 host="victim' and fields["by"] == "127.0.0.1"


FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_fields(line):
    """The key=value fields of an event line, values unquoted (JSON strings)."""
    body = line.split("] ", 1)[1]
    fields = []
    for key, value in FIELD.findall(body):
        fields.append((key, json.loads(value) if value.startswith('"') else value))
    return fields
