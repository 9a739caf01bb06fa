"""Reading a request body: within ``max_body_bytes`` and ``body_timeout_s``, parsed off the
event loop (a large JSON body takes seconds to parse; the loop must keep answering
``/healthz`` meanwhile), with at most ``max_large_bodies`` large bodies in flight at once."""
from __future__ import annotations

import asyncio
import hashlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .codecs import CodecError, loads_strict
from .errors import ApiError

#: Bodies over this size (or of unknown size) wait for a large-body slot.
LARGE_BODY = 1 << 20


@dataclass
class Body:
    json: Any
    files: dict | None
    size: int  # bytes received
    digest: str  # sha256 of what was sent (the idempotency fingerprint)


@asynccontextmanager
async def body_slot(request: Request, state):
    """Hold a large-body slot for the request's lifetime if its body is large or of unknown size."""
    cl = request.headers.get("content-length")
    large = cl is None or not cl.isdigit() or int(cl) > LARGE_BODY
    if not large:
        yield
        return
    async with state.large_bodies:
        yield


async def read_body(request: Request, settings) -> Body:
    """The body as parsed JSON (and file parts for multipart), or ``ApiError``."""
    raw, size = await receive_body(request, settings)
    return await parse_body(request, raw, size, settings.max_body_bytes)


async def receive_body(request: Request, settings) -> tuple[bytes, int]:
    """The raw body and its size, within ``max_body_bytes`` and ``body_timeout_s`` (413, 408)."""
    limit = settings.max_body_bytes
    too_large = ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes; send "
                         "smaller arrays (npy is the most compact encoding)")
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise ApiError(422, "invalid_request", "the Content-Length header is not a number; send a valid one")
        if int(cl) > limit:
            raise too_large
    chunks, size = [], 0

    async def receive_all():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {settings.body_timeout_s:g} s; "
                       "send it at once") from None
    return b"".join(chunks), size


async def parse_body(request: Request, raw: bytes, size: int, limit: int) -> Body:
    """``raw`` as a ``Body``: JSON, or multipart with a part named ``request`` (422)."""
    ctype = request.headers.get("content-type", "").lower()
    files = None
    if ctype.startswith("multipart/form-data"):
        json_part, files = await _multipart(request, raw, limit)
        if json_part is None:
            raise ApiError(422, "invalid_request", 'the multipart request has no part named "request"; '
                           "send the JSON body in a part named request")
        digest = await run_in_threadpool(_digest_parts, json_part, files)
        raw = json_part
    elif ctype.startswith("application/x-www-form-urlencoded"):
        raise ApiError(422, "invalid_request", "form-encoded bodies are not accepted; send JSON "
                       "(Content-Type: application/json) or multipart/form-data")
    else:
        digest = None
    if not raw.strip():
        raise ApiError(422, "invalid_request", "the body is empty; send the request JSON as in API.md")
    try:
        parsed = await run_in_threadpool(loads_strict, raw)
    except CodecError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    if digest is None:
        digest = await run_in_threadpool(lambda: hashlib.sha256(raw).hexdigest())
    return Body(parsed, files, size, digest)


def _digest_parts(json_part: bytes, files: dict) -> str:
    h = hashlib.sha256(json_part)
    for name in sorted(files):
        h.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


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
