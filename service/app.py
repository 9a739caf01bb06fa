"""The FastAPI app (docs/API.md): ``create_app(settings, models)`` wires the routers
(``service/routers/``) to one ``State`` (``deps.py``) and answers every error in the API's one
shape. The lifespan starts the worker, then loads the checkpoints and resumes the jobs a
previous process left (in a thread; ``/readyz`` answers 503 meanwhile); on shutdown it
stops admitting and puts the running batch back in the queue (``State.begin_shutdown``).
"""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .deps import State
from .job import JobsError
from .metrics import RequestCounter
from .worker import JobManager
from .errors import STATUS_CODES, ApiError, error_body, scrub
from .routers import catalogue, docs, health, jobs, oip, web
from .settings import Settings

log = logging.getLogger("reconserve.app")


def create_app(settings: Settings | None = None, models: dict | None = None, make_jobs=None) -> FastAPI:
    """The app; ``make_jobs`` as in ``State`` (default: jobs run in this process)."""
    settings = settings or Settings()
    state = State(settings, models, make_jobs or JobManager)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            import torch
            torch.set_num_threads(settings.torch_threads)
        log.info("device %s; job store %s", settings.device, state.store.url)
        state.jobs.start()
        if models is None:
            threading.Thread(target=state.load, name="reconserve-load-models", daemon=True).start()
        else:
            await run_in_threadpool(state.load)
        try:
            yield
        finally:
            state.begin_shutdown()
            await run_in_threadpool(state.jobs.stop)

    app = FastAPI(title="reconserve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Inverse problems solved with diffusion priors (docs/API.md).")
    app.state.reconserve = state
    add_error_handlers(app)
    for router in (health.router, catalogue.router, jobs.router, oip.router, docs.router, web.router):
        app.include_router(router)
    app.mount(docs.PREFIX, docs.assets(), name="docs-assets")
    app.mount(web.PREFIX, web.assets(), name="web-assets")
    app.add_middleware(RequestCounter, metrics=state.metrics)
    app.openapi = lambda: openapi(app, state)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(JobsError)
    async def _jobs_error(request: Request, exc: JobsError):
        return await _api_error(request, jobs.http_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return JSONResponse(error_body("invalid_request", scrub("; ".join(parts) + "; see docs/API.md")), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404:
            msg = "no such endpoint; see docs/API.md for the endpoints (GET /docs lists them)"
        elif exc.status_code == 405:
            msg = "method not allowed on this endpoint; see docs/API.md for the methods each endpoint takes"
        else:
            msg = scrub(str(exc.detail)) if exc.detail else code.replace("_", " ")
        status = exc.status_code if exc.status_code < 500 else 422
        return JSONResponse(error_body(code, msg), status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug
        log.exception("unexpected error")
        return JSONResponse(error_body("internal_error", "an unexpected error occurred; the request "
                                       "was not processed"), 500)


def openapi(app: FastAPI, state: State) -> dict:
    """FastAPI's schema plus the request model (built from the registries at start)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    req = state.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update(req.pop("$defs", {}))
    comps["ReconstructionRequest"] = req
    app.openapi_schema = schema
    return schema
