"""docs/openapi.yaml describes the whole HTTP API, and a fuzzer that reads it
(schemathesis) finds no server error, no traceback and no inconsistency in
a real server (contract section 6)."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from servers import ROOT, http
from twisted.internet.task import Clock

from distributex.backend.memory import InMemoryBackend
from distributex.catalog import Catalog, PoolSpec
from distributex.events import EventHub
from distributex.metrics import PoolMetrics
from distributex.operators import Operators
from distributex.web import DistributexResource

pytestmark = pytest.mark.timeout(180)

DOCUMENT = os.path.join(ROOT, "docs", "openapi.yaml")
#: Requests per operation: enough to reach every parameter's odd values,
#: few enough to keep the suite quick (about 400 requests in all).
EXAMPLES = 45


def schema():
    return schemathesis.openapi.from_path(DOCUMENT)


def served_paths():
    clock = Clock()
    catalog = Catalog({"p": PoolSpec("p")})
    backend = InMemoryBackend(catalog, clock, clock=clock.seconds)
    resource = DistributexResource(backend, catalog, clock)
    metrics = PoolMetrics(catalog.find)
    Operators(backend, lambda: catalog, EventHub(clock), metrics, clock).install(resource)
    return {path.decode() for path in resource._routes if not path.startswith(b"/static/")}


def test_the_document_is_valid_openapi():
    assert len(list(schema().get_all_operations())) == 9


def test_every_path_served_is_documented_and_every_documented_path_is_served():
    documented = {op.ok().path for op in schema().get_all_operations()}
    served = {p if p.endswith("/") or p in ("/metrics", "/health") else p + "/" for p in served_paths()}
    served = {p for p in served if not (p.endswith("//"))} | {"/"}
    assert {p.rstrip("/") or "/" for p in documented} == {p.rstrip("/") or "/" for p in served}


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    from servers import DistributexServer

    # Every name is a pool (a pattern), so that generated names reach the
    # rules; its leases are short, so that a generated /wait on a pool that
    # earlier cases left held is answered within a second.
    server = DistributexServer({"pools": [{"name": "pool1", "expire": 30},
                                          {"pattern": "*", "expire": 1, "maxlocks": 2, "max_waiters": 20}]},
                               workdir=str(tmp_path_factory.mktemp("fuzz")))
    yield server
    server.kill()


OPERATIONS = [op.ok() for op in schema().get_all_operations() if op.ok().path != "/events/"]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_fuzzing_finds_no_server_error_and_every_answer_is_as_documented(fuzzed_server, operation):
    granted = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case):
        try:
            response = case.call(base_url=fuzzed_server.url, timeout=10)
        except Exception as e:  # a /wait on a busy pool may take its timeout
            if "timed out" in str(e).lower():
                return
            raise
        assert response.status_code < 500 or response.status_code == 503, (case.as_curl_command(), response.text)
        case.validate_response(response)
        if response.status_code == 200 and response.content == b"YES":
            granted.append(response.headers["x-distributex-token"])

    check()
    log = fuzzed_server.log()
    assert "Traceback" not in log and "Unhandled" not in log
    # Consistent afterwards: no pool holds more than its slots, tokens unique.
    pools = http(f"{fuzzed_server.url}/status/?format=json").json()["pools"]
    tokens = [h["token"] for p in pools for h in p["holders"]]
    assert len(tokens) == len(set(tokens))
    assert all(len(p["holders"]) <= p["maxlocks"] for p in pools)
