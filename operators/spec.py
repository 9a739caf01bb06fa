"""Operators from specs (API.md "Operator kinds"): the registry and building.

``build_operator({"kind": "blur", "gaussian": {"sigma": 2}}, in_shape=(1, 64, 64))``
validates every parameter and raises ``OperatorSpecError`` (a ``ValueError``) that says which
field was wrong, what was wrong and what is expected instead. Arrays arrive decoded (numpy arrays or
nested lists). What a kind *is* lives in its class (``operators.base.Operator``: ``Spec``,
``check_spec``, ``observation_shape``, ``from_spec``); this module only looks kinds up.
``build_pde`` does the same for the request's ``pde`` block.
"""
from __future__ import annotations

import math
from typing import Any

from .base import Operator
from .blur import Blur
from .imaging import Identity, Inpainting, SparsePoints, SuperResolution
from .sensing import MAX_CS_ENTRIES, MRI, CompressedSensing
from .checks import (MAX_SEED, Invalid, OperatorSpecError, UnknownKindError, check_in_shape, checked, fail,
                     integer, number)
from .pde import PDE_RESIDUALS, PDEResidual, grid_spacing
from .tomography import CT

#: Registry: the request's ``operator.kind`` values, each one class.
OPERATORS: dict[str, type[Operator]] = {
    cls.kind: cls
    for cls in (Identity, Inpainting, SparsePoints, Blur, SuperResolution, CompressedSensing, MRI, CT)
}

__all__ = ["OPERATORS", "MAX_CS_ENTRIES", "MAX_SEED", "OperatorSpecError", "UnknownKindError", "Invalid",
           "operator_class", "validate_operator_spec", "build_operator", "build_pde"]


def operator_class(spec: Any) -> type[Operator]:
    """The class of a spec's ``kind`` (``UnknownKindError`` if none)."""
    if not isinstance(spec, dict):
        fail("operator", f"expected an object, got {type(spec).__name__}", '{"kind": ..., ...parameters}')
    kind = spec.get("kind")
    cls = OPERATORS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        shown = repr(kind) if len(repr(kind)) <= 40 else "(a long value)"  # never echo much input
        raise UnknownKindError("operator.kind", f"unknown kind {shown}", f"one of {sorted(OPERATORS)}")
    return cls


def validate_operator_spec(spec: dict, in_shape) -> tuple[str, dict]:
    """``(kind, constructor kwargs)`` after checking every parameter against ``in_shape``."""
    check_in_shape(in_shape)
    cls = operator_class(spec)
    return cls.kind, cls.validate_spec(spec, in_shape)


def build_operator(spec: dict, in_shape) -> Operator:
    """The operator a request's ``operator`` block describes, for images of shape ``in_shape``."""
    check_in_shape(in_shape)
    return operator_class(spec).from_spec(spec, in_shape)


# ----------------------------------------------------------------------------- PDE block helpers
def _number(value, field: str, **bounds) -> float:
    return checked(field, number, value, **bounds)


def _integer(value, field: str, **bounds) -> int:
    return checked(field, integer, value, **bounds)


def _keys(params: dict, field: str, allowed: set, required: set = frozenset()):
    unknown = sorted(set(params) - allowed)
    if unknown:
        fail(field, f"unknown parameter(s) {unknown}",
             f"only {sorted(allowed)}" if allowed else "no parameters besides kind")
    missing = sorted(required - set(params))
    if missing:
        fail(field, f"missing parameter(s) {missing}", f"{missing}")


_check_in_shape = check_in_shape
_fail = fail


# ----------------------------------------------------------------------------- PDE block
_PDE_PARAMS = {"darcy": {"f", "channels"}, "poisson": {"channels"}, "helmholtz": {"k", "channels"}}


def build_pde(spec: dict | None, in_shape, defaults: dict | None) -> PDEResidual:
    """The PDE residual of a request's ``pde`` block ``{"kind": ..., ...overrides}``.

    ``defaults`` is the model card's ``pde`` block (its parameters are used unless the
    request overrides them; keys other than the PDE's parameters, such as ``h``, are
    checked where meaningful and otherwise ignored). Parameters: ``f`` (darcy), ``k``
    (helmholtz), ``channels`` = [a index, u index] (all; default [0, 1]).
    """
    c, n, m = _check_in_shape(in_shape)
    if not defaults or not defaults.get("kind"):
        raise OperatorSpecError("pde", "this model has no PDE", "pde: null")
    card_kind = defaults["kind"]
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        _fail("pde", f"expected an object, got {type(spec).__name__}", f'{{"kind": "{card_kind}"}}')
    kind = spec.get("kind", card_kind)
    if kind not in PDE_RESIDUALS:
        raise UnknownKindError("pde.kind", f"unknown PDE {kind!r}", f"{card_kind!r} (this model's PDE)")
    if kind != card_kind:
        raise OperatorSpecError("pde.kind", f"this model's PDE is {card_kind!r}, not {kind!r}",
                                f'{{"kind": "{card_kind}"}}')
    allowed = _PDE_PARAMS[kind]
    overrides = {k: v for k, v in spec.items() if k != "kind"}
    _keys(overrides, "pde", allowed)
    params = {**{k: v for k, v in defaults.items() if k in allowed}, **overrides}
    if n != m or n < 3:
        raise OperatorSpecError("pde", f"needs an N x N grid with N >= 3, the model is {n} x {m}")
    if "h" in defaults and not math.isclose(float(defaults["h"]), grid_spacing(n), rel_tol=1e-9):
        raise OperatorSpecError("pde", f"the card's h={defaults['h']} does not match 1/(N-1) for N={n} "
                                "(the model card is wrong)")
    kwargs: dict[str, Any] = {}
    channels = params.get("channels", (0, 1))
    if isinstance(channels, (str, bytes, dict)) or not hasattr(channels, "__len__") or len(channels) != 2:
        _fail("pde.channels", f"expected [a index, u index], got {channels!r}", "two channel indices")
    channels = tuple(_integer(i, "pde.channels", minimum=0, maximum=c - 1) for i in channels)
    if channels[0] == channels[1]:
        _fail("pde.channels", "a and u are the same channel", "two different indices")
    kwargs["channels"] = channels
    if kind == "darcy":
        kwargs["f"] = _number(params.get("f", 1.0), "pde.f")
    if kind == "helmholtz":
        kwargs["k"] = _number(params.get("k", 1.0), "pde.k", minimum=0)
    return PDE_RESIDUALS[kind]((c, n, m), **kwargs)
