"""``/healthz`` (liveness: the process and its worker thread), ``/readyz``, ``/metrics``."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..deps import AUTH, State, get_state
from ..errors import error_body
from ..metrics import CONTENT_TYPE_LATEST
from .common import ERROR_RESPONSES

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: ERROR_RESPONSES[503]})
async def healthz(state: State = Depends(get_state)):
    """Liveness: 200 while the process and its worker thread run (503 `worker_dead` otherwise)."""
    if not is_live(state):
        # the worker thread died: fail liveness so that the orchestrator restarts the process
        # (recovery then resumes every queued and running job)
        return JSONResponse(error_body("worker_dead", "the worker thread is not running; restart the "
                                       "process (queued jobs resume on start)"), 503)
    return {"status": "ok"}


def is_live(state: State) -> bool:
    """False once the worker thread has died (``/healthz``, ``/v2/health/live``)."""
    return state.jobs.alive or state.shutting_down


@router.get("/readyz", responses={503: ERROR_RESPONSES[503]})
async def readyz(state: State = Depends(get_state)):
    """Readiness: 200 once the models are loaded and the previous run's jobs are queued again."""
    if not state.ready:
        return JSONResponse(error_body("not_ready", not_ready_message(state)), 503, headers={"Retry-After": "5"})
    body = {"status": "ready", "models": sorted(state.models), "device": state.settings.device}
    if state.skipped_models:
        body["skipped_models"] = state.skipped_models  # folders that failed to load, and why
    return body


def not_ready_message(state: State) -> str:
    """Why the service is not ready (``/readyz``, ``/v2/health/ready``)."""
    if state.shutting_down:
        reason = "shutting down"
    elif state.load_error:
        reason = state.load_error
    elif state.models is None:
        reason = "loading models"
    elif not state.recovered:
        reason = "resuming the jobs of the previous run"
    elif not getattr(state.jobs, "workers_ready", True):
        reason = "no worker replica has answered yet (starting, or none is running)"
    else:
        reason = "worker not running"
    return f"not ready: {reason}; retry in a few seconds"


@router.get("/metrics", dependencies=AUTH, response_class=Response, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}}, 401: ERROR_RESPONSES[401]})
async def metrics(state: State = Depends(get_state)):
    """Prometheus metrics (queue depth, running jobs, durations, network evaluations, batching)."""
    return Response(state.metrics.render(state.settings.device), media_type=CONTENT_TYPE_LATEST)
