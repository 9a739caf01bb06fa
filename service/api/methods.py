"""Methods on the wire: each method's request model, made from its config's declared fields.

``method_model(method)`` is ``{"name": <method>, ...its parameters}``: each config field with
its type, range and meaning (``guidance.params.param``), no default in the schema (an omitted
parameter takes the model card's tuned value, else the config's default) and no other key.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from guidance.params import Declared, MethodError, declared, per_channel
from guidance.registry import Method
from operators.params import spec_error

from ..errors import ApiError


def _param_type(hint: Any, d: Declared) -> Any:
    """The request type of a config field (a scalar type, or a union with per-channel lists)."""
    if d.choices is not None:
        return Literal[d.choices]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.Union[tuple(_param_type(a, d) for a in typing.get_args(hint))]
    if typing.get_origin(hint) is tuple:  # per-channel values: a JSON list
        return Annotated[list[_param_type(typing.get_args(hint)[0], d)], Field(min_length=1)]
    if hint is int:
        return Annotated[int, Field(ge=d.minimum, le=d.maximum)]
    if hint is float:
        return Annotated[float, Field(ge=d.minimum, le=d.maximum, gt=d.above, allow_inf_nan=False)]
    return hint if hint in (bool, str, type(None)) else Any


@functools.cache
def method_model(method: Method) -> type[BaseModel]:
    """The pydantic model of a request's ``method`` block naming ``method``."""
    hints = typing.get_type_hints(method.config)
    fields: dict[str, Any] = {"name": (Literal[method.name], Field(description="the method"))}
    for f in dataclasses.fields(method.config):
        typ = _param_type(hints[f.name], declared(f))
        if f.name == "steps":
            typ = typing.Optional[typ]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        d = declared(f)
        unit = f"; unit: {d.unit}" if d.unit else ""
        fields[f.name] = (typ, Field(default_factory=lambda d=default: d, description=(
            f"{d.doc}{unit}; default {default!r} (or the model card's tuned value: GET /v1/methods?model=)")))
    title = "".join(p.capitalize() for p in method.name.split("_")) + "Method"
    return create_model(title, __config__=ConfigDict(extra="forbid"),
                        __doc__=f"{method.summary} ({method.paper})", **fields)


def parse_method(model: type[BaseModel], block: dict) -> BaseModel:
    """A request's ``method`` block parsed by its model (``method_model``), or ``ApiError`` 422."""
    try:
        return model.model_validate(block)
    except ValidationError as e:
        raise ApiError(422, "invalid_method", spec_error(e, model, "method").render("send", "GET /v1/methods")) \
            from None


def method_error(e: MethodError, sent: dict | None = None, card_id: str = "", method: str = "") -> ApiError:
    """A method's misfit to a problem as the API answers it; a value the request did not send is
    named as the model card's tuned default."""
    field = f"method.{e.field}" if e.field else "method"
    whence = "" if e.field is None or e.field in (sent or {}) else \
        f" (the value is model {card_id}'s tuned default for {method})"
    msg = f"{field}: {e.problem}" + (f"; send {e.expected}" if e.expected else "")
    return ApiError(422, "invalid_method", msg + whence)


def _info(method: Method, f: dataclasses.Field) -> dict:
    d = declared(f)
    bounds = {"minimum": d.minimum, "maximum": d.maximum, "exclusive_minimum": d.above,
              "choices": list(d.choices) if d.choices else None, "unit": d.unit}
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    return {"default": default, "meaning": d.doc, **{k: v for k, v in bounds.items() if v is not None},
            "per_channel": per_channel(method.config, f.name)}


def describe_method(method: Method, card: dict | None = None) -> dict:
    """A method as ``GET /v1/methods`` lists it: its defaults, and each parameter's meaning, unit
    and range; with a model's ``card``, the values that card runs it with (``tuned``; null: the
    card does not recommend it)."""
    out = method.describe()
    out["parameter_info"] = {f.name: _info(method, f) for f in dataclasses.fields(method.config)}
    if card is not None:
        entry = next((m for m in card.get("methods") or [] if m.get("name") == method.name), None)
        out["tuned"] = None if entry is None else {k: v for k, v in entry.items() if k != "name"}
    return out
