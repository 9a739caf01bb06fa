"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

Every operation of ``GET /openapi.json`` is called in-process (the app's ASGI interface, lifespan
running, as in ``conftest.py``) with requests generated from the schema: valid ones and invalid
ones (wrong types, missing fields, bodies that break ``ReconstructionRequest``...). Whatever is
sent, the answer must

- never be a 5xx (``not_a_server_error``);
- have a status code the operation documents (``status_code_conformance``), with a documented
  content type (``content_type_conformance``), headers (``response_headers_conformance``) and a
  body that matches the documented schema (``response_schema_conformance``) - for errors, the
  API's one shape ``{"error": {"code", "message"}}``.

Bounded so that the file takes about a minute on 2 shared cores (the acceptance allows three):
``MAX_EXAMPLES`` generated cases per operation and generation mode, each request under
``DEADLINE_MS``, and a small admission policy (few steps, samples and queued jobs) so that the
valid jobs the fuzzer manages to build stay cheap. ``derandomize`` plus a fixed schemathesis
seed make every run generate the same cases (reproducible in CI); no example database is kept.
"""
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")  # a dev dependency (pyproject's [dev] extra)
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from svc_helpers import MODELS  # noqa: E402

MAX_EXAMPLES = 25
DEADLINE_MS = 20_000
SEED = 20240608

CHECKS = [schemathesis.checks.not_a_server_error,
          schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance,
          schemathesis.checks.response_headers_conformance,
          schemathesis.checks.response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    """The app (small admission limits: generated valid jobs stay cheap) and its schema, loaded
    through its ASGI interface; schemathesis starts the lifespan and keeps it for every call."""
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("fuzz"), batch_window_ms=0, max_steps=20,
                              max_nfe=40, max_samples=2, queue_size=4, job_deadline_s=30,
                              max_job_cost=5e6, max_body_bytes=256 * 1024, max_array_elements=4096),
                     MODELS)
    config = SchemathesisConfig.from_dict({"seed": SEED, "generation": {"deterministic": True,
                                                                        "database": "none"}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    try:
        yield schema
    finally:
        shutdown_lifespans()  # the app's lifespan: stops its worker


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=timedelta(milliseconds=DEADLINE_MS), derandomize=True,
          database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=CHECKS, timeout=30)
