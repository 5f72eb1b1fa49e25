"""A bounded schemathesis run of ``POST /v1/images/generations`` against the real uvicorn server of ``serve`` (on a
stub orchestrator): valid and invalid bodies generated from ``/openapi.json`` must get the answers the schema
documents (valid -> 200, invalid -> 4xx, never a 5xx, every status and body as documented). The schema is generated
from ``runtime.requests.FIELDS``, the table the validation uses; this run is what shows they agree."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from http_stub_server import ThreadServer, stub_config  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def operation():
    # caps off: they depend on the config, not on the request schema (n x W x H x steps is tested elsewhere)
    cfg = stub_config(api_key=KEY, max_pixels_steps=0)
    cfg.stages.denoiser.max_batch_pixels = cfg.stages.vae.max_batch_pixels = 0
    with ThreadServer(cfg) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")["/v1/images/generations"]["POST"]


@pytest.mark.parametrize("mode", ["POSITIVE", "NEGATIVE"])
def test_generations_answers_match_the_schema(operation, mode):
    """schemathesis' own pytest plugin does not run under this pytest; its strategies and checks do."""
    strategy = operation.as_strategy(generation_mode=getattr(schemathesis.GenerationMode, mode))

    @given(strategy)
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})

    run()


@pytest.fixture(scope="module")
def schema():
    cfg = stub_config(api_key=KEY, metrics_require_key=True)
    with ThreadServer(cfg) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")


@pytest.mark.parametrize("path", ["/v1/requests/{request_id}", "/metrics", "/health", "/v1/models"])
@pytest.mark.parametrize("auth", [True, False])
def test_get_routes_answer_as_documented(schema, path, auth):
    """Every GET route's answers (status, content type, body) conform to /openapi.json, with and without the key:
    unknown request ids (404) and the Prometheus text of /metrics included (issue 31)."""
    op = schema[path]["GET"]
    headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
    seen = set()

    @given(op.as_strategy())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        seen.add(case.call_and_validate(headers=headers).status_code)

    run()
    expected = {"/v1/requests/{request_id}": 404, "/metrics": 200, "/health": 200, "/v1/models": 200}[path]
    if not auth and path in ("/v1/requests/{request_id}", "/metrics", "/v1/models"):
        expected = 401
    assert seen == {expected}
