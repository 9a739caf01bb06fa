"""The web page at ``/`` (``service/web/``: plain HTML, CSS and ES modules, no build step, no
network beyond this server) and the one helper it needs beyond ``/v1``: ``POST /web/demo``, a
demonstration observation made by the server's own operator from a held-out example of the
model's training data. Neither is part of the API's schema (``/openapi.json`` is unchanged)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from operators.checks import OperatorSpecError, UnknownKindError
from operators.spec import OPERATORS

from ..api.operators import operator_error, parse_operator
from ..codecs import encode_array
from ..deps import READY, State, get_state
from ..errors import ApiError
from ..prepare import _decode_operator

PAGE_DIR = Path(__file__).resolve().parents[1] / "web"
PREFIX = "/web"
#: Examples are drawn with seeds from here on: held out, like docs/examples (training used seed 0).
EXAMPLE_SEED = 1000003
MAX_EXAMPLE = 99

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page():
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html")


def assets() -> StaticFiles:
    return StaticFiles(directory=PAGE_DIR)


@router.post(f"{PREFIX}/demo", dependencies=READY)
async def demo(request: Request, state: State = Depends(get_state)):
    """``{"model", "operator", "example": k, "noise_sigma", "seed"}`` -> ``{"truth", "observation"}``
    (encoded arrays): example ``k`` of the model's data kind and ``A(truth) + noise_sigma * e``."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(422, "invalid_request", "the body is not JSON; send {\"model\", \"operator\", "
                       "\"example\", \"noise_sigma\"}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "send a JSON object {\"model\", \"operator\", \"example\"}")
    model = (state.models or {}).get(body.get("model"))
    if model is None:
        raise ApiError(404, "unknown_model", f"no model with this id; send one of {sorted(state.models or {})}")
    example, sigma, seed = _demo_numbers(body)
    truth = await run_in_threadpool(example_of, model.card, example)
    op = _operator(body.get("operator"), tuple(model.card["shape"]), state.settings)
    y = op(torch.as_tensor(truth[None], dtype=torch.float64))[0].numpy()
    y = y + sigma * np.random.default_rng(seed).standard_normal(y.shape)  # additive Gaussian noise
    return JSONResponse({"truth": encode_array(truth), "observation": encode_array(y),
                         "example": example, "noise_sigma": sigma})


def _demo_numbers(body: dict) -> tuple[int, float, int]:
    k, sigma, seed = body.get("example", 0), body.get("noise_sigma", 0.0), body.get("seed", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_EXAMPLE:
        raise ApiError(422, "invalid_request", f"example must be an integer 0..{MAX_EXAMPLE}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 <= sigma < 1e6:
        raise ApiError(422, "invalid_request", "noise_sigma must be a number >= 0")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ApiError(422, "invalid_request", "seed must be an integer >= 0")
    return k, float(sigma), seed


def example_of(card: dict, k: int) -> np.ndarray:
    """Example ``k`` (``[C, H, W]``) of the data the model was trained on, with a held-out seed."""
    from models.data import KINDS, generate
    kind = (card.get("training") or {}).get("data")
    shape = card["shape"]
    if kind not in KINDS or shape[1] != shape[2]:
        raise ApiError(422, "no_examples", f"model {card['id']} has no example data; upload an observation")
    data, _ = generate(kind, 1, shape[-1], EXAMPLE_SEED + k)
    return data[0].astype(np.float64)


def _operator(block, shape: tuple, settings):
    """The operator a request's ``operator`` block describes (404/422 as for a job)."""
    cls = OPERATORS.get(block.get("kind")) if isinstance(block, dict) else None
    if cls is None:
        raise ApiError(404, "unknown_operator", f"operator.kind is not a known operator kind; send one of "
                       f"{sorted(OPERATORS)} (GET /v1/operators)")
    try:
        spec = _decode_operator(parse_operator(cls, block), settings, None, {})
        return cls(shape, **cls.check_spec(spec, shape))
    except UnknownKindError as e:
        raise operator_error(e, "unknown_operator", 404) from None
    except OperatorSpecError as e:
        raise operator_error(e) from None
