"""``/v1/models``, ``/v1/operators``, ``/v1/methods``."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from guidance.registry import METHODS
from operators.spec import OPERATORS

from .. import schemas
from ..api.methods import describe_method
from ..api.operators import describe_operator
from ..deps import AUTH, READY, State, get_state
from ..errors import ApiError
from .common import ERROR_RESPONSES, public_card

router = APIRouter(tags=["catalogue"])

@router.get("/v1/models", response_model=schemas.ModelList, dependencies=READY, responses=ERROR_RESPONSES)
async def list_models(state: State = Depends(get_state)):
    """The served models, each with its card (shape, channels, units, PDE, recommended methods)."""
    return JSONResponse({"models": [public_card(m.card) for m in state.models.values()]})


@router.get("/v1/models/{model_id}", response_model=schemas.ModelCard, dependencies=READY,
            responses=ERROR_RESPONSES)
async def get_model(model_id: str, state: State = Depends(get_state)):
    """One model's card."""
    m = state.models.get(model_id)
    if m is None:
        raise ApiError(404, "unknown_model", f"no model with this id; send one of {sorted(state.models)}")
    return JSONResponse(public_card(m.card))


@router.get("/v1/operators", response_model=schemas.OperatorList, dependencies=AUTH, responses=ERROR_RESPONSES)
async def list_operators():
    """The operator kinds, each with the JSON schema of its parameters and its observation shape."""
    return JSONResponse({"operators": [describe_operator(cls) for cls in OPERATORS.values()]})


@router.get("/v1/methods", response_model=schemas.MethodList, dependencies=AUTH, responses=ERROR_RESPONSES)
async def list_methods(model: str | None = Query(None, description="a model id: show the values its card runs "
                                                                    "each method with (tuned)"),
                       state: State = Depends(get_state)):
    """The sampling methods, each with its parameters (defaults, meaning, unit, range) and network
    evaluations per step; with ``?model=``, the values that model's card runs each method with."""
    card = None
    if model is not None:
        found = state.models.get(model)
        if found is None:
            raise ApiError(404, "unknown_model", f"model is not a known model id; send one of {sorted(state.models)}")
        card = found.card
    return JSONResponse(public_card({"methods": [describe_method(METHODS[n], card) for n in METHODS]}))
