"""``/v1/jobs`` (submit, status, events, result, cancel) and ``/v1/reconstruct``.

Submission order (API.md "Admission"): the body is read and parsed off the event loop; an
``Idempotency-Key`` already seen answers its job; the cheap checks give the job's cost; the
queue reserves room for it (or answers ``429`` at once); only then are the arrays decoded and
the operator built (at most ``max_preparations`` at a time); the job is written to the store
and queued, and only then is ``202`` answered.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import schemas
from ..body import body_slot, read_body
from ..codecs import CodecError, encode_array
from ..deps import AUTH, READY, State, caller_of, get_job, get_state
from ..errors import ApiError
from ..admission import ShuttingDown
from ..job import Job, JobResult, JobsError
from ..labfiles import LAB_RECORD, Window, read_lab_record
from ..labfiles.results import FORMATS, result_file, wanted_format
from ..prepare import admit, build
from ..settings import examples_dir
from .common import ERROR_RESPONSES

log = logging.getLogger("reconserve.app")
router = APIRouter(tags=["jobs"])

#: The request bodies of docs/examples (made by its make_examples.py), shown in /docs; a wheel
#: ships them as package data.
EXAMPLES_DIR = examples_dir()


def _examples() -> dict:
    out = {}
    for path in sorted(EXAMPLES_DIR.glob("*-request.json")) if EXAMPLES_DIR.is_dir() else ():
        try:
            out[path.stem] = {"summary": f"docs/examples/{path.name}", "value": json.loads(path.read_text())}
        except (OSError, ValueError):  # an example is a convenience, never a reason not to start
            continue
    return out


EXAMPLES = _examples()
BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ReconstructionRequest"},
                         **({"examples": EXAMPLES} if EXAMPLES else {})},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "request": {"type": "string", "description": "the JSON body; arrays may be {\"file\": part}"}},
        "additionalProperties": {"type": "string", "format": "binary"}}}}}}
IDEMPOTENCY_DOC = {"parameters": [{
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "the same key with the same body returns the same job; with another body, 422",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255}}]}
KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def _job_error_status(code: str) -> int:
    return {"cancelled": 409, "shutting_down": 503, "out_of_memory": 413}.get(code, 422)


#: The HTTP status of each refusal of the job layer (``service.job.JobsError``).
REFUSAL_STATUS = {"queue_full": 429, "shutting_down": 503, "expired": 410}


def http_error(e: JobsError) -> ApiError:
    """A refusal of the job layer (queue full, shutting down, result expired) as the API answers it."""
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return ApiError(REFUSAL_STATUS[e.code], e.code, e.message, headers=headers)


async def accept(request: Request, state: State, read=read_body) -> tuple[Job, bool]:
    """A submitted job: ``(job, new)``; ``new`` is False for a repeated ``Idempotency-Key``.
    ``read(request, settings)``: the ``Body`` (another protocol's reader, e.g. ``/v2`` infer)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not KEY_RE.fullmatch(key):
        raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII "
                       "characters without spaces; send e.g. a UUID")
    settings = state.settings
    async with body_slot(request, state):
        body = await read(request, settings)
        if key is not None:
            seen = await run_in_threadpool(state.jobs.by_key, key)
            if seen is not None:
                return _same_body(seen, body.digest), False
        adm = await run_in_threadpool(admit, body.json, state.request_model, state.models, settings, body.files)
        reservation = state.jobs.reserve(adm.cost, body.size)
        try:
            problem, arrays, stored = await run_in_threadpool(_build, state, adm, body.files)
            if state.shutting_down:
                raise ShuttingDown()
            job, new = await run_in_threadpool(state.jobs.submit, problem, reservation, stored, arrays,
                                               key, body.digest, caller_of(request, settings))
        finally:
            state.jobs.release(reservation)
    return (job, True) if new else (_same_body(job, body.digest), False)


def _build(state: State, adm, files):
    with state.jobs.preparations:
        return build(adm, state.settings, files)


def _same_body(job: Job, digest: str) -> Job:
    if job.body_digest != digest:
        raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was sent before with another body "
                       f"(job {job.id}); send a new key for a new request")
    return job


@router.post("/v1/jobs", status_code=202, response_model=schemas.JobStatus, dependencies=READY,
             openapi_extra={**BODY_DOC, **IDEMPOTENCY_DOC}, responses={
                 200: {"model": schemas.JobStatus, "description": "the job an Idempotency-Key named before"},
                 **ERROR_RESPONSES})
async def submit_job(request: Request, state: State = Depends(get_state)):
    """Submit a reconstruction: 202 once the job is durable, with `Location: /v1/jobs/{id}`. An `Idempotency-Key` already seen with the same body answers 200 with the same job."""
    job, new = await accept(request, state)
    return JSONResponse(job.status_dict(), 202 if new else 200, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs", response_model=schemas.JobList, dependencies=AUTH, responses=ERROR_RESPONSES)
async def list_jobs(request: Request, state: State = Depends(get_state),
                    status: list[schemas.JobState] = Query([], description="only jobs in these states (repeatable)"),
                    limit: int = Query(50, ge=1, le=200, description="jobs per page"),
                    page_token: str | None = Query(None, max_length=200, description="next_page_token of the "
                                                   "previous page")):
    """The caller's jobs (those submitted with the same API key; every job where the server takes
    no keys), newest first, a page at a time; `status` filters."""
    after = _read_token(page_token)
    jobs = await run_in_threadpool(state.jobs.listing, caller_of(request, state.settings), tuple(status),
                                   limit, after)
    last = jobs[-1] if len(jobs) == limit else None
    token = None if last is None else base64.urlsafe_b64encode(f"{last.created_ts!r}|{last.id}".encode()).decode()
    return JSONResponse({"jobs": [j.status_dict() for j in jobs], "next_page_token": token})


def _read_token(token: str | None) -> tuple[float, str] | None:
    if token is None:
        return None
    try:
        ts, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return float(ts), job_id
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "invalid_request", "page_token is not one this server gave; send the "
                       "next_page_token of the previous page, or none for the first") from None


@router.get("/v1/jobs/{job_id}", response_model=schemas.JobStatus, dependencies=AUTH, responses=ERROR_RESPONSES)
async def job_status(job: Job = Depends(get_job)):
    """A job's status and progress."""
    return JSONResponse(job.status_dict())


@router.get("/v1/jobs/{job_id}/events", dependencies=AUTH, responses={
    200: {"content": {"text/event-stream": {}}, "description": "progress events, then one status event"},
    **ERROR_RESPONSES})
async def job_events(job: Job = Depends(get_job), state: State = Depends(get_state)):
    """Server-sent events: `progress` events, then one `status` event (the final status, or the status at a shutdown with `"server": "shutting_down"`)."""
    return StreamingResponse(sse(job, state), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


#: ``?format=`` and ``?field=`` of a result (API.md "Lab data"; ``service/labfiles/results.py``).
ResultFormat = Literal["nifti", "dicom", "tiff", "npy"]
ResultField = Literal["mean", "std", "samples"]
FORMAT_QUERY = Query(None, alias="format", description="nifti, dicom, tiff or npy: the field as that file, in the "
                     "observation's geometry and units (default: JSON, or the Accept header's type)")
FIELD_QUERY = Query("mean", description="with a file format: the array it holds (mean, std or samples)")
FILE_RESPONSES = {200: {"content": {media: {} for media, _ in FORMATS.values()}}}


@router.get("/v1/jobs/{job_id}/result", response_model=schemas.Result, dependencies=AUTH,
            responses={**FILE_RESPONSES, **ERROR_RESPONSES})
async def job_result(request: Request, job: Job = Depends(get_job), state: State = Depends(get_state),
                     fmt: ResultFormat | None = FORMAT_QUERY, field: ResultField = FIELD_QUERY):
    """The result of a succeeded job; `?format=nifti|dicom|tiff|npy` (or `Accept: application/x-nifti`, `application/zip`, `image/tiff`, `application/x-npy`) gives the mean (`?field=std|samples`: another array) as that file; 409 while it runs; the job's error when it failed; 410 past retention."""
    return await answer(request, state, job, await finished(job, state), fmt, field)


@router.get("/v1/jobs/{job_id}/result.png", dependencies=AUTH,
            responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
async def job_result_png(job: Job = Depends(get_job), state: State = Depends(get_state),
                         slice_k: str | None = Query(None, alias="slice", description="volumes: draw slice k "
                                                     "(0-based) alone; without it, a montage of every slice")):
    """A picture of the result: observation, mean and std (with a colour scale); for a volume a montage of its slices, or slice `k` with `?slice=k`."""
    from ..montage import chosen, volume_png
    result = chosen(await finished(job, state), slice_k)  # 422 for a bad slice
    model = (state.models or {}).get(job.model_id)
    try:
        data = await run_in_threadpool(volume_png, model.card if model is not None else {}, result)
    except Exception:  # noqa: BLE001 - a picture is a convenience; never a 5xx
        log.exception("rendering %s failed", job.id)
        raise ApiError(422, "render_failed", "this result cannot be drawn; fetch the arrays from "
                       f"GET /v1/jobs/{job.id}/result instead") from None
    return Response(data, media_type="image/png")


@router.delete("/v1/jobs/{job_id}", response_model=schemas.JobStatus, dependencies=AUTH, responses=ERROR_RESPONSES)
async def cancel_job(job: Job = Depends(get_job), state: State = Depends(get_state)):
    """A queued job is ``cancelled`` at once; a running one answers ``cancelling`` and stops at
    its next step."""
    job = await run_in_threadpool(state.jobs.cancel, job.id) or job
    return JSONResponse(job.status_dict())


@router.post("/v1/reconstruct", response_model=schemas.Result, dependencies=READY,
             openapi_extra={**BODY_DOC}, responses={**FILE_RESPONSES, **ERROR_RESPONSES})
async def reconstruct(request: Request, state: State = Depends(get_state),
                      fmt: ResultFormat | None = FORMAT_QUERY, field: ResultField = FIELD_QUERY):
    """Submit and wait: the same body as `POST /v1/jobs`, answered with the `Result` (200), or with a file as `GET /v1/jobs/{id}/result?format=` answers it."""
    job, _ = await accept(request, state)
    await wait_done(job, state, request)
    return await answer(request, state, job, await finished(job, state), fmt, field)


# ---------------------------------------------------------------------------- helpers
async def finished(job: Job, state: State) -> JobResult:
    st = job.status
    if st in ("queued", "running", "cancelling"):
        raise ApiError(409, "not_finished", f"the job is {st}; wait for it to finish "
                       f"(GET /v1/jobs/{job.id}/events or poll GET /v1/jobs/{job.id}) and ask again")
    if st != "succeeded":
        err = job.error or {"code": st, "message": f"the job {st}"}
        raise ApiError(_job_error_status(err["code"]), err["code"], err["message"])
    return await run_in_threadpool(state.jobs.result_of, job)


async def wait_done(job: Job, state: State, request: Request) -> None:
    """Until the job finishes. A client that hangs up cancels its job; a shutdown answers
    ``503`` (the job stays queued for the next start)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    job.subscribe(loop, event, progress=False)
    try:
        while not job.done.is_set():
            if state.shutting_down:
                raise ApiError(503, "shutting_down", f"the server is shutting down; job {job.id} stays queued and "
                               f"resumes when it restarts: fetch GET /v1/jobs/{job.id}/result then",
                               headers={"Retry-After": "5", "Location": f"/v1/jobs/{job.id}"})
            event.clear()
            if job.done.is_set():
                break
            try:
                await asyncio.wait_for(event.wait(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    await run_in_threadpool(state.jobs.cancel, job.id)  # nobody waits for it any more
                    return
    finally:
        job.unsubscribe(loop, event, progress=False)


async def sse(job: Job, state: State):
    """Progress events, then one ``status`` event: the final status, or the status at a
    shutdown (``"server": "shutting_down"``; the job resumes after the restart)."""
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
            if state.shutting_down:
                yield f"event: status\ndata: {json.dumps(dict(st, server='shutting_down'))}\n\n"
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


async def answer(request: Request, state: State, job: Job, result: JobResult, fmt: str | None, field: str):
    """The result as JSON, or as the file ``?format=`` or ``Accept`` asks for."""
    lab = await run_in_threadpool(job_lab, state, job, result)
    fmt = wanted_format(fmt, request.headers.get("accept", ""))
    if fmt is None:
        return JSONResponse(await run_in_threadpool(result_body, job, result, Window(*lab["window"])))
    try:
        data = await run_in_threadpool(result_file, fmt, field, result, lab)
    except CodecError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    media, ext = FORMATS[fmt]
    return Response(data, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="{job.id}-{field}{ext}"'})


def job_lab(state: State, job: Job, r: JobResult) -> dict:
    """The job's observation file header and value window (``read_lab_record``), cached on its result."""
    if "lab" not in r._encoded:
        r._encoded["lab"] = read_lab_record(state.jobs.store.load_request_file(job.id, LAB_RECORD))
    return r._encoded["lab"]


def result_body(job: Job, r: JobResult, window: Window = Window()) -> dict:
    """The ``Result`` JSON (arrays encoded once, in the data's units, cached on the result)."""
    if "body" not in r._encoded:
        want = set(job.returns)
        r._encoded["body"] = {
            "id": job.id,
            "mean": encode_array(window.values(r.mean)) if "mean" in want else None,
            "std": encode_array(window.spread(r.std)) if "std" in want and r.std is not None else None,
            "samples": encode_array(window.values(r.samples)) if "samples" in want else None,
            "metrics": r.metrics, "nfe": r.nfe, "elapsed_s": r.elapsed_s, "seed": job.seed,
            "model": job.model_id, "method": r.method, "batched_with": r.batched_with,
            "num_samples": job.num_samples,
        }
    return r._encoded["body"]
