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

Four tests: every operation from the schema as served; the submissions with bodies narrowed to
served models and the limits (they reach the operator, method and array checks and the worker);
every operation with API keys on; and a stateful workflow that submits valid small jobs and
follows their ids into status, events, result, result.png and cancel.

Bounded to about 1.5 minutes on 2 busy shared cores (the acceptance allows three):
``MAX_EXAMPLES`` fuzzed cases per operation (fewer for the keys and the workflow), plus
schemathesis's coverage phase (boundary values; its count follows the schema), each request
under ``DEADLINE_MS``, and a small admission policy with models tuned to a few steps so that the
valid jobs the fuzzer builds cost milliseconds. ``derandomize`` plus a fixed seed make every run
send the same requests (reproducible in CI); no example database is kept.
"""
import collections
import copy
import functools
import os
import tempfile
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")  # a dev dependency (pyproject's [dev] extra)
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402

from models.checkpoint import LoadedModel  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.helpers.service import MASK, MODELS, OBS, body, npy_b64  # noqa: E402

#: Thousands of generated requests: over a minute on two cores (``make test`` runs it).
pytestmark = pytest.mark.slow

#: Generated cases per operation and phase, and the seed; a deeper local run:
#: ``RECONSERVE_FUZZ_EXAMPLES=1000 RECONSERVE_FUZZ_SEED=7 pytest tests/service/test_service_fuzz.py``.
MAX_EXAMPLES = int(os.environ.get("RECONSERVE_FUZZ_EXAMPLES", 100))
SEED = int(os.environ.get("RECONSERVE_FUZZ_SEED", 20240608))
#: Longest a single request may take (hypothesis deadline); the costliest admitted job takes ~50 ms.
DEADLINE_MS = 20_000

CHECKS = [schemathesis.checks.not_a_server_error,
          schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance,
          schemathesis.checks.response_headers_conformance,
          schemathesis.checks.response_schema_conformance]


#: The test models but slow-32 (a sleeping copy of grf-32, for tests that need a job to stay
#: running), with every method tuned to a few steps on their cards: a job that names no steps
#: (most of what the fuzzer builds) then costs milliseconds, not a 200- to 2000-step default.
FEW_STEPS = [{"name": "fast", "steps": 8}, {"name": "ald", "steps": 8, "final_corrector_steps": 8},
             {"name": "dps", "steps": 8}, {"name": "diffusion_pde", "steps": 8}]
FUZZ_MODELS = {}
for _id, _m in MODELS.items():
    if _id != "slow-32":
        _own = [c["name"] for c in _m.card.get("methods") or []]  # the card's order: its default first
        _tuned = sorted(FEW_STEPS, key=lambda d: _own.index(d["name"]) if d["name"] in _own else len(_own))
        FUZZ_MODELS[_id] = LoadedModel(dict(_m.card, methods=_tuned), _m.denoiser)
#: A small admission policy: the costliest job it admits (20 steps, 2 samples) takes ~50 ms here.
LIMITS = dict(batch_window_ms=0, max_steps=20, max_nfe=200, max_samples=2, queue_size=4, job_deadline_s=30,
              max_job_cost=5e6, max_body_bytes=256 * 1024, max_array_elements=4096)


class FreshApp:
    """The ASGI app under test: a new app (``create_app(Settings(**LIMITS, **settings))`` on a
    fresh data dir, as in ``conftest.py``) each time a lifespan starts. schemathesis starts the
    lifespan on an operation's first request and ends it after the operation's test, and an
    app's lifespan runs once (as under uvicorn), so every operation gets its own app. Made when
    the tests run, not when pytest collects this file (``data_dir`` set by ``fresh_apps``)."""

    data_dir = None  # shared by every FreshApp
    made = 0

    def __init__(self, **settings):
        self.settings, self.app = settings, None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            assert FreshApp.data_dir is not None, "the fresh_apps fixture did not run"
            FreshApp.made += 1
            self.app = create_app(Settings(data_dir=FreshApp.data_dir / f"app{FreshApp.made}", **LIMITS,
                                           **self.settings), FUZZ_MODELS)
        await self.app(scope, receive, send)


def openapi() -> dict:
    """``GET /openapi.json`` of an app made as ``FreshApp`` makes them (a copy; the schema is
    needed at collection, to make one test per operation)."""
    return copy.deepcopy(_openapi())


@functools.cache
def _openapi() -> dict:
    from fastapi.testclient import TestClient
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=tmp, **LIMITS), FUZZ_MODELS)
        spec = TestClient(app).get("/openapi.json").json()  # no lifespan: the schema needs none
        app.state.reconserve.store.engine.dispose()
    return spec


def submissions_openapi() -> dict:
    """The same schema with the request body narrowed, for the submissions only: ``model`` one of
    the served ids, ``num_samples`` and every method's ``steps`` within the limits, and a valid
    small job as the body's example. Requests generated from the schema as served mostly stop
    at ``404 unknown_model`` (or over the step and sample limits); these reach the operator,
    array and cost checks and the worker, and the example runs a job to the end (``202``/``200``
    bodies checked against the schema too). No ``Idempotency-Key`` here (the test of the served
    schema sends them): a generated key sent again would only answer its first job.
    The responses, and so the checks, are the served ones."""
    spec = openapi()
    comps = spec["components"]["schemas"]
    req = comps["ReconstructionRequest"]["properties"]
    req["model"]["enum"] = sorted(FUZZ_MODELS)
    req["num_samples"]["maximum"] = LIMITS["max_samples"]
    for comp in comps.values():  # every method's steps (one method block, or one per method)
        steps = comp.get("properties", {}).get("steps", {})
        for branch in steps.get("anyOf", [steps]):
            if branch.get("type") == "integer":
                branch["maximum"] = LIMITS["max_steps"]
    example = body(method={"name": "fast", "steps": 4}, num_samples=1)
    for path in ("/v1/jobs", "/v1/reconstruct"):
        op = spec["paths"][path]["post"]
        op["requestBody"]["content"]["application/json"]["example"] = example
        op.pop("parameters", None)  # Idempotency-Key
    return spec


def load(spec: dict, app: FreshApp, coverage: str | None = "all"):
    """The schema, calling ``app``. ``coverage``: the modes of schemathesis's coverage phase
    (``"all"``, ``"positive"``: boundary values of every field, or None: no coverage phase); its
    count of cases grows with the schema and is not bounded by ``max_examples``. The examples
    and the fuzzing phases always run."""
    cov = {"enabled": False} if coverage is None else {"generation": {"mode": coverage}}
    loaded = schemathesis.openapi.from_dict(spec, config=SchemathesisConfig.from_dict(
        {"seed": SEED, "generation": {"deterministic": True, "database": "none"}, "phases": {"coverage": cov}}))
    loaded.app = app
    return loaded


schema = load(openapi(), FreshApp())
submissions = load(submissions_openapi(), FreshApp(), coverage="positive").include(method="POST")
#: API keys on; the fuzzer sends none (the schema declares no security scheme): 401 everywhere but
#: /healthz and /readyz, which must be documented as well.
locked = load(openapi(), FreshApp(api_keys=("fuzz-key",)), coverage=None)


@pytest.fixture(scope="module", autouse=True)
def fresh_apps(tmp_path_factory):
    FreshApp.data_dir = tmp_path_factory.mktemp("fuzz")
    try:
        yield
    finally:
        shutdown_lifespans()  # (schemathesis ends each lifespan after each test anyway)
        FreshApp.data_dir = None


BOUNDS = settings(max_examples=MAX_EXAMPLES, deadline=timedelta(milliseconds=DEADLINE_MS), derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))


#: (operation, status) of every fuzzed request: what the fuzzing reached.
REACHED: collections.Counter = collections.Counter()


def call_and_check(case):
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    REACHED[(case.operation.label, response.status_code)] += 1
    trace(case, response)


def trace(case, response) -> None:
    """``RECONSERVE_FUZZ_TRACE=1 pytest -s ...``: one line per request (what the fuzzer reaches)."""
    if os.environ.get("RECONSERVE_FUZZ_TRACE"):
        mode = case.meta.generation.mode.value if case.meta else "stateful"
        print("FUZZ", case.operation.label, mode, response.status_code, f"{response.elapsed:.3f}",
              response.text_lossy()[:150], flush=True)


@schema.parametrize()
@BOUNDS
def test_api_conforms_to_its_schema(case):
    """Every operation, requests generated from the schema as served."""
    call_and_check(case)


@submissions.parametrize()
@BOUNDS
def test_submissions_conform_to_the_schema(case):
    """``POST /v1/jobs`` and ``/v1/reconstruct`` with bodies closer to valid ones."""
    call_and_check(case)


@locked.parametrize()
@settings(BOUNDS, max_examples=max(1, MAX_EXAMPLES // 10))
def test_api_with_keys_conforms_to_its_schema(case):
    """Every operation with API keys on and no key sent."""
    call_and_check(case)


# ----------------------------------------------------------------------------- stateful: jobs followed
def jobs_openapi() -> dict:
    """The job operations, with ``POST /v1/jobs`` bodies drawn from valid small jobs: a grf-32
    inpainting or a toy-darcy-16 sparse-points problem, any method, steps, samples, seed,
    noise, returned arrays and completion. Most submissions are accepted, so the links the
    workflow follows lead to real jobs."""
    spec = openapi()
    pts = [[0, 2, 3], [0, 7, 7], [1, 12, 5], [1, 4, 13]]
    problems = [
        {"model": "grf-32", "operator": {"kind": "inpainting", "mask": {"npy": npy_b64(MASK)}},
         "observation": {"npy": npy_b64(OBS)}},
        {"model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": pts},
         "observation": [3.0, 12.0, 0.01, 0.0]},
    ]
    common = {
        "method": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": {"enum": ["fast", "dps", "ald", "diffusion_pde"]},
            "steps": {"type": "integer", "minimum": 1, "maximum": 20}}},
        "num_samples": {"type": "integer", "minimum": 1, "maximum": LIMITS["max_samples"]},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "noise_sigma": {"type": "number", "minimum": 0, "maximum": 1},
        "return": {"type": "array", "uniqueItems": True, "items": {"enum": ["mean", "std", "samples"]}},
        "completion": {"enum": ["auto", "solve", "off"]},
    }
    spec["components"]["schemas"]["ReconstructionRequest"] = {"oneOf": [{
        "type": "object", "additionalProperties": False, "required": ["model", "operator", "observation"],
        "properties": {**{k: {"const": v} for k, v in p.items()}, **common}} for p in problems]}
    spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"].pop("multipart/form-data")
    spec["paths"]["/v1/jobs"]["post"].pop("parameters", None)  # Idempotency-Key: see submissions_openapi
    return spec


class JobWorkflow(load(jobs_openapi(), FreshApp()).include(path_regex="^/v1/jobs").as_state_machine()):
    """Sequences of calls: schemathesis infers the links (a submitted job's ``id`` into the
    ``{job_id}`` of status, events, result, result.png and cancel) and follows them, so those
    operations see real jobs: queued, running, cancelled, failed and succeeded."""

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)
        trace(case, response)


def test_the_fuzzing_reached_the_solvers():
    """Generated submissions got past validation into the worker: some answered 200/202 (runs
    after the fuzzing tests above, in file order; alone it has nothing to look at)."""
    posts = {k: n for k, n in REACHED.items() if k[0] in ("POST /v1/jobs", "POST /v1/reconstruct")}
    if not posts:
        pytest.skip("run with the fuzzing tests above")
    assert sum(n for (_, status), n in posts.items() if status in (200, 202)) > 0, posts
    assert not [k for k in REACHED if k[1] >= 500]


TestJobWorkflow = JobWorkflow.TestCase
TestJobWorkflow.settings = settings(BOUNDS, max_examples=max(1, MAX_EXAMPLES * 3 // 10), stateful_step_count=10)
