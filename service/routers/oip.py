"""Open Inference Protocol (KServe v2) endpoints beside /v1 (docs/API.md "Open Inference
Protocol"): health, model metadata and readiness, and infer: a synchronous ``/v1/reconstruct``
through the same admission, queue, batching and job store (``jobs.accept``, ``wait_done``,
``finished``), its request read and its answer written by ``service/oip.py``. Every error is
answered in the protocol's form, ``{"error": "<message>"}``, with the status /v1 gives.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .. import oip
from ..body import Body, receive_body
from ..deps import AUTH, READY, State, get_state
from ..errors import ApiError
from ..job import JobsError
from ..labfiles import Window
from ..labfiles.results import field_array
from . import jobs
from .health import is_live, not_ready_message


class OipRoute(APIRoute):
    """A route whose errors (its dependencies' too) answer ``{"error": message}``."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answered(request: Request):
            try:
                return await handler(request)
            except JobsError as e:  # queue full, shutting down: as /v1 answers them
                return error_response(jobs.http_error(e))
            except ApiError as e:
                return error_response(e)
        return answered


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, e.status, headers=e.headers)


router = APIRouter(tags=["open inference protocol (v2)"], route_class=OipRoute)


class OipError(BaseModel):
    error: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, str]


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[dict[str, Any]]


ERRORS = {s: {"model": OipError, "description": d} for s, d in (
    (401, "API key missing or wrong"), (404, "unknown model"), (408, "the body did not arrive in time"),
    (409, "the job was cancelled"), (413, "body or array over the limits"), (422, "invalid request"),
    (429, "queue full (Retry-After)"), (503, "not ready or shutting down (Retry-After)"))}
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "enum": [oip.OBSERVATION]},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": list(oip.DATATYPES)},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
    "data": {"type": "array", "description": "row-major values, flat or nested"}}}
INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "description": "the /v1 request's other fields: operator, method, "
                       "noise_sigma, num_samples, seed, ... (JSON text or numbers); binary_data_output",
                       "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": list(oip.OUTPUTS)},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description":
                                 f"binary tensor extension: the JSON ({oip.HEADER_LENGTH} bytes), then the data"}}}}


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata():
    """The server's name, version and protocol extensions."""
    return {"name": "reconserve", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", response_model=Live, responses={503: ERRORS[503]})
async def live(state: State = Depends(get_state)):
    """Liveness, as `GET /healthz`: 503 once the worker thread has died."""
    if not is_live(state):
        raise ApiError(503, "worker_dead", "the worker thread is not running; restart the process "
                       "(queued jobs resume on start)")
    return {"live": True}


@router.get("/v2/health/ready", response_model=Ready, responses={503: ERRORS[503]})
async def ready(state: State = Depends(get_state)):
    """Readiness, as `GET /readyz`: 503 while models load, jobs resume, or the server shuts down."""
    if not state.ready:
        raise ApiError(503, "not_ready", not_ready_message(state), headers={"Retry-After": "5"})
    return {"ready": True}


def _card(state: State, model_id: str) -> dict:
    m = state.models.get(model_id)
    if m is None:
        raise ApiError(404, "unknown_model", f"no model with this id; send one of {sorted(state.models)}")
    return m.card


@router.get("/v2/models/{model_id}", response_model=ModelMetadata, dependencies=READY, responses=ERRORS)
async def model_metadata(model_id: str, state: State = Depends(get_state)):
    """The model's input (`observation`, FP32 or FP64), outputs (`mean`, `std`) and the parameters an infer request takes."""
    return oip.model_metadata(_card(state, model_id), state.request_model)


@router.get("/v2/models/{model_id}/ready", response_model=ModelReady, dependencies=AUTH, responses=ERRORS)
async def model_ready(model_id: str, state: State = Depends(get_state)):
    """200 when the model is served and the service ready; 404 for an unknown model, 503 while not ready."""
    if not state.ready:
        raise ApiError(503, "not_ready", not_ready_message(state), headers={"Retry-After": "5"})
    _card(state, model_id)
    return {"name": model_id, "ready": True}


class InferReader:
    """``jobs.accept``'s body reader for an infer request; keeps the request it read."""

    def __init__(self, model_id: str):
        self.model_id, self.infer = model_id, None

    async def __call__(self, request: Request, settings) -> Body:
        raw, size = await receive_body(request, settings)
        header = request.headers.get(oip.HEADER_LENGTH)
        return await run_in_threadpool(self._read, raw, size, header, settings.max_array_elements)

    def _read(self, raw: bytes, size: int, header: str | None, max_elements: int) -> Body:
        self.infer = oip.read_infer(raw, header, max_elements)
        return self.infer.body(self.model_id, size, oip.digest(raw))


@router.post("/v2/models/{model_id}/infer", response_model=InferResponse, dependencies=READY,
             openapi_extra=INFER_DOC,
             responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS})
async def infer(model_id: str, request: Request, state: State = Depends(get_state)):
    """A synchronous reconstruction (as `POST /v1/reconstruct`): the input `observation`, the other fields in `parameters`; outputs `mean` and, with more than one sample, `std` (binary tensor extension where asked)."""
    reader = InferReader(model_id)
    job, _ = await jobs.accept(request, state, reader)
    await jobs.wait_done(job, state, request)
    result = await jobs.finished(job, state)
    lab = await run_in_threadpool(jobs.job_lab, state, job, result)
    window, infer = Window(*lab["window"]), reader.infer
    names = [n for n in (infer.outputs or oip.OUTPUTS) if n != "std" or result.std is not None]
    arrays = {n: field_array(result, n, window) for n in names}
    params = {"job_id": job.id, "seed": job.seed, "num_samples": job.num_samples, "nfe": result.nfe,
              "elapsed_s": result.elapsed_s, "batched_with": result.batched_with,
              "method": json.dumps(result.method), "metrics": json.dumps(result.metrics)}
    body, headers = await run_in_threadpool(oip.response, model_id, infer, arrays, params)
    return Response(body, headers=headers)
