"""The FastAPI app (API.md): thin routes over ``prepare`` (validation), ``jobs`` (queue and
worker) and ``codecs`` (arrays). ``create_app(settings, models)``; the lifespan loads the
checkpoints (in a thread, ``/readyz`` answers 503 meanwhile) and starts the worker.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from guidance.registry import METHODS
from models.checkpoint import default_checkpoint_dir, load_models
from operators.spec import OPERATORS, operator_schemas

from . import schemas
from .codecs import CodecError, encode_array, loads_strict, npy_bytes
from .errors import STATUS_CODES, ApiError, error_body, scrub
from .jobs import Job, JobManager
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .prepare import prepare
from .settings import Settings

log = logging.getLogger("reconserve.app")

OBSERVATION_SHAPES = {
    "identity": "[C,H,W]", "inpainting": "[C,H,W]", "sparse_points": "[N]", "blur": "[C,H,W]",
    "super_resolution": "[C,H/f,W/f]", "compressed_sensing": "[m]", "mri": "[2,H,W]",
}
ERROR_RESPONSES = {s: {"model": schemas.Error, "description": d} for s, d in (
    (401, "API key missing or wrong"), (404, "unknown model, operator kind, method or job"),
    (409, "result asked for before the job finished"), (413, "body or array over the limits"),
    (422, "invalid request"), (429, "queue full (Retry-After)"), (503, "not ready"))}


def _job_error_status(code: str) -> int:
    return {"cancelled": 409, "shutting_down": 503, "out_of_memory": 413}.get(code, 422)


class State:
    def __init__(self, settings: Settings, models: dict | None):
        self.settings = settings
        self.models = models
        self.load_error: str | None = None
        self.metrics = ServiceMetrics()
        self.jobs = JobManager(settings, self.metrics)
        self.request_model = schemas.make_request_model(list(OPERATORS), list(METHODS))

    @property
    def ready(self) -> bool:
        return self.models is not None and self.jobs.alive


def create_app(settings: Settings | None = None, models: dict | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings, models)

    def load() -> None:
        try:
            folders = [default_checkpoint_dir()] + ([settings.models_dir] if settings.models_dir else [])
            state.models = load_models(*folders, device=settings.device)
            log.info("loaded models: %s", sorted(state.models))
        except Exception as e:  # noqa: BLE001 - stay alive, /readyz tells
            log.exception("loading models failed")
            state.load_error = scrub(f"loading the models failed: {e}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            import torch
            torch.set_num_threads(settings.torch_threads)
        if state.models is None:
            threading.Thread(target=load, name="reconserve-load-models", daemon=True).start()
        state.jobs.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.jobs.stop)

    app = FastAPI(title="reconserve", version="1", lifespan=lifespan,
                  description="Inverse problems solved with diffusion priors (API.md).")
    app.state.reconserve = state

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return JSONResponse(error_body("invalid_request", scrub("; ".join(parts) + "; see API.md")), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404:
            msg = "no such endpoint; see API.md for the endpoints (GET /docs lists them)"
        elif exc.status_code == 405:
            msg = "method not allowed on this endpoint; see API.md for the methods each endpoint takes"
        else:
            msg = scrub(str(exc.detail)) if exc.detail else code.replace("_", " ")
        status = exc.status_code if exc.status_code < 500 else 422
        return JSONResponse(error_body(code, msg), status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug
        log.exception("unexpected error")
        return JSONResponse(error_body("internal_error", "an unexpected error occurred; the request "
                                       "was not processed"), 500)

    # ------------------------------------------------------------------ dependencies
    async def require_key(request: Request) -> None:
        keys = settings.api_keys
        if not keys:
            return
        key = request.headers.get("x-api-key")
        if key is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        ok = False
        if key:
            given = key.encode("utf-8", "replace")
            for k in keys:  # compare with every key: no early exit
                ok |= hmac.compare_digest(given, k.encode("utf-8"))
        if not ok:
            raise ApiError(401, "unauthorized", "a valid API key is required; send the header "
                           "X-API-Key: <key> or Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})

    async def require_ready() -> None:
        if not state.ready:
            raise ApiError(503, "not_ready", state.load_error or
                           "the service is starting (loading models); retry in a few seconds",
                           headers={"Retry-After": "5"})

    auth = [Depends(require_key)]
    ready = [Depends(require_key), Depends(require_ready)]

    def get_job(job_id: str) -> Job:
        job = state.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", "no job with this id (finished jobs are kept for "
                           f"{settings.result_ttl_s:g} s); send an id returned by POST /v1/jobs")
        return job

    async def parse_request(request: Request) -> Job:
        body, files = await read_request(request, settings)
        problem = await run_in_threadpool(prepare, body, state.request_model, state.models, settings, files)
        return state.jobs.submit(problem)

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: ERROR_RESPONSES[503]})
    async def readyz():
        if not state.ready:
            reason = state.load_error or ("loading models" if state.models is None else "worker not running")
            return JSONResponse(error_body("not_ready", f"not ready: {reason}; retry in a few seconds"), 503)
        return {"status": "ready", "models": sorted(state.models), "device": settings.device}

    @app.get("/metrics", tags=["health"], dependencies=auth)
    async def metrics():
        return Response(state.metrics.render(settings.device), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ catalogue
    @app.get("/v1/models", response_model=schemas.ModelList, dependencies=ready, tags=["catalogue"],
             responses=ERROR_RESPONSES)
    async def list_models():
        return JSONResponse({"models": [public_card(m.card) for m in state.models.values()]})

    @app.get("/v1/models/{model_id}", response_model=schemas.ModelCard, dependencies=ready,
             tags=["catalogue"], responses=ERROR_RESPONSES)
    async def get_model(model_id: str):
        m = state.models.get(model_id)
        if m is None:
            raise ApiError(404, "unknown_model", f"no model with this id; send one of {sorted(state.models)}")
        return JSONResponse(public_card(m.card))

    @app.get("/v1/operators", response_model=schemas.OperatorList, dependencies=auth, tags=["catalogue"])
    async def list_operators():
        s = operator_schemas()
        return JSONResponse({"operators": [
            {"kind": k, "observation_shape": OBSERVATION_SHAPES.get(k, ""), "schema": s[k]} for k in OPERATORS]})

    @app.get("/v1/methods", response_model=schemas.MethodList, dependencies=auth, tags=["catalogue"])
    async def list_methods():
        return JSONResponse(public_card({"methods": [METHODS[n].describe() for n in METHODS]}))

    # ------------------------------------------------------------------ jobs
    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ReconstructionRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "request": {"type": "string", "description": "the JSON body; arrays may be {\"file\": part}"}},
            "additionalProperties": {"type": "string", "format": "binary"}}}}}}

    @app.post("/v1/jobs", status_code=202, response_model=schemas.JobStatus, dependencies=ready,
              tags=["jobs"], openapi_extra=body_doc, responses=ERROR_RESPONSES)
    async def submit_job(request: Request):
        job = await parse_request(request)
        return JSONResponse(job.status_dict(), 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}", response_model=schemas.JobStatus, dependencies=auth, tags=["jobs"],
             responses=ERROR_RESPONSES)
    async def job_status(job_id: str):
        return JSONResponse(get_job(job_id).status_dict())

    @app.get("/v1/jobs/{job_id}/events", dependencies=auth, tags=["jobs"], responses={
        200: {"content": {"text/event-stream": {}}, "description": "progress events, then one status event"},
        **ERROR_RESPONSES})
    async def job_events(job_id: str):
        job = get_job(job_id)
        return StreamingResponse(sse(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/result", response_model=schemas.Result, dependencies=auth, tags=["jobs"],
             responses={200: {"content": {"application/x-npy": {}}}, **ERROR_RESPONSES})
    async def job_result(job_id: str, request: Request):
        job = finished(get_job(job_id))
        if "application/x-npy" in request.headers.get("accept", ""):
            data = await run_in_threadpool(lambda: npy_bytes(job.result.mean.astype("float32")))
            return Response(data, media_type="application/x-npy",
                            headers={"Content-Disposition": f'attachment; filename="{job.id}-mean.npy"'})
        return JSONResponse(await run_in_threadpool(result_body, job))

    @app.get("/v1/jobs/{job_id}/result.png", dependencies=auth, tags=["jobs"],
             responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
    async def job_result_png(job_id: str):
        from .render import render_png
        job = finished(get_job(job_id))
        try:
            data = await run_in_threadpool(render_png, job)
        except Exception:  # noqa: BLE001 - a picture is a convenience; never a 5xx
            log.exception("rendering %s failed", job.id)
            raise ApiError(422, "render_failed", "this result cannot be drawn; fetch the arrays from "
                           f"GET /v1/jobs/{job.id}/result instead") from None
        return Response(data, media_type="image/png")

    @app.delete("/v1/jobs/{job_id}", response_model=schemas.JobStatus, dependencies=auth, tags=["jobs"],
                responses=ERROR_RESPONSES)
    async def cancel_job(job_id: str):
        get_job(job_id)
        job = state.jobs.cancel(job_id)
        if job is None:  # pragma: no cover - evicted in between
            raise ApiError(404, "unknown_job", "no job with this id; send an id returned by POST /v1/jobs")
        if not job.terminal:  # running: it stops at its next step
            await wait_done(job, None, timeout=2.0)
        return JSONResponse(job.status_dict())

    @app.post("/v1/reconstruct", response_model=schemas.Result, dependencies=ready, tags=["jobs"],
              openapi_extra=body_doc, responses=ERROR_RESPONSES)
    async def reconstruct(request: Request):
        job = await parse_request(request)
        await wait_done(job, request)
        return JSONResponse(await run_in_threadpool(result_body, finished(job)))

    # ------------------------------------------------------------------ helpers
    def finished(job: Job) -> Job:
        st = job.status
        if st in ("queued", "running"):
            raise ApiError(409, "not_finished", f"the job is {st}; wait for it to finish "
                           f"(GET /v1/jobs/{job.id}/events or poll GET /v1/jobs/{job.id}) and ask again")
        if st != "succeeded":
            err = job.error or {"code": st, "message": f"the job {st}"}
            raise ApiError(_job_error_status(err["code"]), err["code"], err["message"])
        return job

    async def wait_done(job: Job, request: Request | None, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        job.subscribe(loop, event, progress=False)
        waited = 0.0
        try:
            while not job.done.is_set():
                event.clear()
                if job.done.is_set():
                    break
                try:
                    await asyncio.wait_for(event.wait(), 1.0)
                except asyncio.TimeoutError:
                    waited += 1.0
                    if request is not None and await request.is_disconnected():
                        state.jobs.cancel(job.id)  # nobody waits for it any more
                        return
                if timeout is not None and waited >= timeout:
                    return
        finally:
            job.unsubscribe(loop, event, progress=False)

    async def sse(job: Job):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        job.subscribe(loop, event)
        last = None
        try:
            while True:
                event.clear()
                st = job.status_dict()
                if st["status"] in schemas.TERMINAL:
                    yield f"event: status\ndata: {json.dumps(st)}\n\n"
                    return
                now = (st["status"], st["progress"]["step"], st["progress"]["total"])
                if now != last:
                    last = now
                    data = {"id": job.id, "status": st["status"], "progress": st["progress"]}
                    yield f"event: progress\ndata: {json.dumps(data)}\n\n"
                try:
                    await asyncio.wait_for(event.wait(), 15.0)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            job.unsubscribe(loop, event)

    def _openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        req = state.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(req.pop("$defs", {}))
        comps["ReconstructionRequest"] = req
        app.openapi_schema = schema
        return schema

    app.openapi = _openapi
    return app


def public_card(card: dict) -> dict:
    """The card as served (JSON-safe copy)."""
    return json.loads(json.dumps(card, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def result_body(job: Job) -> dict:
    """The ``Result`` JSON (arrays encoded once, cached on the job)."""
    r, p = job.result, job.problem
    with job.lock:
        cache = r._encoded
    if "body" not in cache:
        want = set(p.returns)
        body = {
            "id": job.id,
            "mean": encode_array(r.mean) if "mean" in want else None,
            "std": encode_array(r.std) if "std" in want and r.std is not None else None,
            "samples": encode_array(r.samples) if "samples" in want else None,
            "metrics": r.metrics, "nfe": r.nfe, "elapsed_s": r.elapsed_s, "seed": p.seed,
            "model": p.model_id, "method": r.method, "batched_with": r.batched_with,
            "num_samples": p.num_samples,
        }
        cache["body"] = body
    return cache["body"]


async def read_request(request: Request, settings: Settings) -> tuple[Any, dict | None]:
    """The body as parsed JSON (and file parts for multipart), within ``max_body_bytes``."""
    limit = settings.max_body_bytes
    too_large = ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes; send "
                         "smaller arrays (npy is the most compact encoding)")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise too_large
        except ValueError:
            raise ApiError(422, "invalid_request", "the Content-Length header is not a number; send "
                           "a valid one") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    ctype = request.headers.get("content-type", "").lower()
    files = None
    if ctype.startswith("multipart/form-data"):
        body, files = await _multipart(request, raw, limit)
        if body is None:
            raise ApiError(422, "invalid_request", 'the multipart request has no part named "request"; '
                           "send the JSON body in a part named request")
        raw = body
    elif ctype.startswith("application/x-www-form-urlencoded"):
        raise ApiError(422, "invalid_request", "form-encoded bodies are not accepted; send JSON "
                       "(Content-Type: application/json) or multipart/form-data")
    if not raw.strip():
        raise ApiError(422, "invalid_request", "the body is empty; send the request JSON as in API.md")
    try:
        return loads_strict(raw), files
    except CodecError as e:
        raise ApiError(e.status, e.code, str(e)) from None


async def _multipart(request: Request, raw: bytes, limit: int) -> tuple[bytes | None, dict]:
    from starlette.datastructures import UploadFile

    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=256, max_fields=256, max_part_size=limit)
    except StarletteHTTPException as e:
        raise ApiError(422, "invalid_multipart", f"the multipart body cannot be parsed ({e.detail}); "
                       "send multipart/form-data with a part named request") from None
    except Exception:  # noqa: BLE001
        raise ApiError(422, "invalid_multipart", "the multipart body cannot be parsed; send "
                       "multipart/form-data with a part named request") from None
    body, files = None, {}
    try:
        for name, value in form.multi_items():
            data = await value.read() if isinstance(value, UploadFile) else value.encode("utf-8")
            if name == "request":
                body = data
            else:
                files[name] = data
    finally:
        await form.close()
    return body, files
