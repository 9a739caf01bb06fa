"""Operators from request specs (API.md "Operator kinds"): validation, registry, JSON schemas.

``build_operator({"kind": "blur", "gaussian": {"sigma": 2}}, in_shape=(1, 64, 64))``
validates every parameter and raises ``OperatorSpecError`` (a ``ValueError``) whose message
says what was wrong and what to send instead. Arrays arrive decoded (numpy arrays or
nested lists). ``build_pde`` does the same for the request's ``pde`` block.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np

from .base import Operator
from .imaging import (MRI, Blur, CompressedSensing, Identity, Inpainting, SparsePoints,
                      SuperResolution, default_gaussian_size)
from .pde import PDE_RESIDUALS, PDEResidual, grid_spacing

#: Registry: the request's ``operator.kind`` values.
OPERATORS: dict[str, type[Operator]] = {
    cls.kind: cls
    for cls in (Identity, Inpainting, SparsePoints, Blur, SuperResolution, CompressedSensing, MRI)
}

#: Largest compressed-sensing matrix (entries) the server holds: 2^25 (256 MiB in float64).
MAX_CS_ENTRIES = 2**25
#: Largest seed accepted (torch.Generator takes 64-bit seeds).
MAX_SEED = 2**63 - 1


class OperatorSpecError(ValueError):
    """An invalid operator or PDE spec; the message says what to send instead."""


class UnknownKindError(OperatorSpecError):
    """The spec's ``kind`` is not in the registry (the service answers 404)."""


# ----------------------------------------------------------------------------- validators
def _fail(field: str, problem: str, fix: str):
    raise OperatorSpecError(f"{field}: {problem}; {fix}")


def _number(value, field: str, *, positive=False, minimum=None) -> float:
    """A finite real number (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(field, f"expected a number, got {type(value).__name__}", "send a JSON number")
    v = float(value)
    if not math.isfinite(v):
        _fail(field, "is NaN or infinite", "send a finite number")
    if positive and v <= 0:
        _fail(field, f"must be > 0, got {v:g}", "send a positive number")
    if minimum is not None and v < minimum:
        _fail(field, f"must be >= {minimum}, got {v:g}", f"send a number >= {minimum}")
    return v


def _integer(value, field: str, *, minimum=None, maximum=None) -> int:
    """An integer (an integral float such as 3.0 is accepted; bools are not)."""
    v = _number(value, field)
    if not v.is_integer():
        _fail(field, f"expected an integer, got {v:g}", "send a whole number")
    i = int(value) if isinstance(value, numbers.Integral) else int(v)
    if minimum is not None and i < minimum:
        _fail(field, f"must be >= {minimum}, got {i}", f"send an integer >= {minimum}")
    if maximum is not None and i > maximum:
        _fail(field, f"must be <= {maximum}, got {i}", f"send an integer <= {maximum}")
    return i


def _array(value, field: str) -> np.ndarray:
    """A finite numeric (or bool) array from a numpy array or nested lists."""
    if isinstance(value, (dict, str, bytes)) or value is None:
        _fail(field, f"expected an array, got {type(value).__name__}",
              'send a nested list of numbers or {"npy": base64}')
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        _fail(field, "is not a rectangular array", "send a nested list with equal-length rows")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        _fail(field, f"has non-numeric entries (dtype {arr.dtype})", "send numbers only")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        _fail(field, "contains NaN or inf", "send finite numbers only")
    return arr


def _shape(arr: np.ndarray) -> str:
    return "[" + ",".join(str(s) for s in arr.shape) + "]"


def _binary(arr: np.ndarray, field: str) -> np.ndarray:
    if not np.isin(arr, (0, 1)).all():
        _fail(field, "must be binary (0 or 1, or true/false)",
              "send 1 where observed/sampled and 0 elsewhere")
    return arr.astype(np.float64)


def _dict(value, field: str, allowed: set, required: set) -> dict:
    if not isinstance(value, dict):
        _fail(field, f"expected an object, got {type(value).__name__}",
              f"send an object with keys {sorted(allowed)}")
    _keys(value, field, allowed, required)
    return value


def _keys(params: dict, field: str, allowed: set, required: set = frozenset()):
    unknown = sorted(set(params) - allowed)
    if unknown:
        _fail(field, f"unknown parameter(s) {unknown}",
              f"send only {sorted(allowed)}" if allowed else "send no parameters besides kind")
    missing = sorted(required - set(params))
    if missing:
        _fail(field, f"missing parameter(s) {missing}", f"send {missing}")


def _check_in_shape(in_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise OperatorSpecError(f"in_shape must be (C, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise OperatorSpecError(f"in_shape must be (C, H, W) of positive sizes, got {in_shape!r}")
    return shape


# ----------------------------------------------------------------------------- per-kind parameter checks
def _identity(p: dict, shape) -> dict:
    _keys(p, "operator", set())
    return {}


def _inpainting(p: dict, shape) -> dict:
    _keys(p, "operator", {"mask"}, {"mask"})
    c, h, w = shape
    mask = _array(p["mask"], "operator.mask")
    if mask.shape not in ((h, w), (c, h, w)):
        _fail("operator.mask", f"has shape {_shape(mask)}",
              f"send shape [H,W]=[{h},{w}] or [C,H,W]=[{c},{h},{w}] matching the model")
    return {"mask": _binary(mask, "operator.mask")}


def _sparse_points(p: dict, shape) -> dict:
    _keys(p, "operator", {"points"}, {"points"})
    pts = _array(p["points"], "operator.points")
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 1:
        _fail("operator.points", f"has shape {_shape(pts)}",
              "send a list [[channel, row, col], ...] of shape [N,3] with N >= 1")
    if not np.issubdtype(pts.dtype, np.integer):
        if not (pts == np.round(pts)).all():
            _fail("operator.points", "has non-integer entries", "send integer (channel, row, col) indices")
    pts = pts.astype(np.int64)
    for axis, (name, size) in enumerate(zip(("channel", "row", "col"), shape)):
        bad = (pts[:, axis] < 0) | (pts[:, axis] >= size)
        if bad.any():
            i = int(np.argmax(bad))
            _fail("operator.points", f"point {i} has {name} {int(pts[i, axis])} outside [0, {size - 1}]",
                  f"send {name} indices in 0..{size - 1} for model shape {list(shape)}")
    return {"points": pts}


def _odd_size(value, field: str, hw: int, minimum: int = 1) -> int:
    size = _integer(value, field, minimum=minimum)
    if size % 2 == 0:
        _fail(field, f"must be odd (a centred kernel), got {size}", f"send {size + 1} or {size - 1}")
    if size > hw:
        _fail(field, f"kernel size {size} exceeds the image size {hw}", f"send an odd size <= {hw}")
    return size


def _blur(p: dict, shape) -> dict:
    _keys(p, "operator", {"kernel", "gaussian", "motion", "boundary"})
    hw = min(shape[1:])
    given = [k for k in ("kernel", "gaussian", "motion") if p.get(k) is not None]
    if len(given) != 1:
        _fail("operator", f"blur got {given or 'none'} of kernel/gaussian/motion",
              'send exactly one: "kernel": [[...]], "gaussian": {"sigma": s, "size": k} '
              'or "motion": {"size": k, "seed": n}')
    boundary = p.get("boundary", "circular")
    if boundary not in ("circular", "reflect"):
        _fail("operator.boundary", f"unknown boundary {boundary!r}", 'send "circular" or "reflect"')
    out: dict[str, Any] = {"boundary": boundary}
    if given == ["kernel"]:
        k = _array(p["kernel"], "operator.kernel").astype(np.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1]:
            _fail("operator.kernel", f"has shape {_shape(k)}", "send a square [k,k] kernel with odd k")
        _odd_size(k.shape[0], "operator.kernel size", hw)
        if abs(k.sum()) < 1e-12:
            _fail("operator.kernel", "sums to 0 (the blur would erase the image mean)",
                  "send a kernel with a nonzero sum, usually normalized to sum 1")
        out["kernel"] = k
    elif given == ["gaussian"]:
        g = _dict(p["gaussian"], "operator.gaussian", {"sigma", "size"}, {"sigma"})
        sigma = _number(g["sigma"], "operator.gaussian.sigma", positive=True)
        size = g.get("size")
        size = _odd_size(default_gaussian_size(sigma) if size is None else size,
                         "operator.gaussian.size", hw)
        out["gaussian"] = {"sigma": sigma, "size": size}
    else:
        mo = _dict(p["motion"], "operator.motion", {"size", "seed"}, {"size"})
        out["motion"] = {"size": _odd_size(mo["size"], "operator.motion.size", hw, minimum=3),
                         "seed": _integer(mo.get("seed", 0), "operator.motion.seed",
                                          minimum=0, maximum=MAX_SEED)}
    return out


def _super_resolution(p: dict, shape) -> dict:
    _keys(p, "operator", {"factor"}, {"factor"})
    f = _integer(p["factor"], "operator.factor", minimum=1)
    _, h, w = shape
    if h % f or w % f:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        _fail("operator.factor", f"{f} does not divide the image size {h}x{w}",
              f"send one of {divisors}")
    return {"factor": f}


def _compressed_sensing(p: dict, shape) -> dict:
    _keys(p, "operator", {"m", "seed", "matrix"})
    n = math.prod(shape)
    if p.get("matrix") is not None:
        if p.get("seed") is not None:
            _fail("operator", "got both seed and matrix", "send either seed (server draws) or matrix")
        a = _array(p["matrix"], "operator.matrix").astype(np.float64)
        if a.ndim != 2 or a.shape[1] != n or a.shape[0] < 1:
            _fail("operator.matrix", f"has shape {_shape(a)}", f"send shape [m, C*H*W] = [m, {n}]")
        if p.get("m") is not None and _integer(p["m"], "operator.m") != a.shape[0]:
            _fail("operator.m", f"{p['m']} differs from the matrix's {a.shape[0]} rows",
                  "send m equal to the number of rows, or leave it out")
        if a.size > MAX_CS_ENTRIES:
            _fail("operator.matrix", f"has {a.size} entries, over the limit {MAX_CS_ENTRIES}",
                  "send fewer measurements")
        return {"matrix": a}
    if p.get("m") is None:
        _fail("operator", "compressed_sensing needs m", f'send "m": 1..{n} (and optionally "seed")')
    m = _integer(p["m"], "operator.m", minimum=1, maximum=n)
    if m * n > MAX_CS_ENTRIES:
        _fail("operator.m", f"{m} x {n} matrix is over the limit of {MAX_CS_ENTRIES} entries",
              f"send m <= {MAX_CS_ENTRIES // n}")
    seed = p.get("seed")
    seed = 0 if seed is None else _integer(seed, "operator.seed", minimum=0, maximum=MAX_SEED)
    return {"m": m, "seed": seed}


def _mri(p: dict, shape) -> dict:
    _keys(p, "operator", {"mask"}, {"mask"})
    c, h, w = shape
    if c not in (1, 2):
        _fail("operator", f"mri needs a 1-channel (real) or 2-channel (real, imaginary) image, "
              f"the model has {c} channels", "use another operator or a 1- or 2-channel model")
    mask = _array(p["mask"], "operator.mask")
    if mask.shape != (h, w):
        _fail("operator.mask", f"has shape {_shape(mask)}",
              f"send a k-space mask of shape [H,W]=[{h},{w}] (DC at [0,0], numpy fft2 layout)")
    return {"mask": _binary(mask, "operator.mask")}


_VALIDATORS: dict[str, Callable[[dict, tuple], dict]] = {
    "identity": _identity, "inpainting": _inpainting, "sparse_points": _sparse_points,
    "blur": _blur, "super_resolution": _super_resolution,
    "compressed_sensing": _compressed_sensing, "mri": _mri,
}


def validate_operator_spec(spec: dict, in_shape) -> tuple[str, dict]:
    """``(kind, constructor kwargs)`` after checking every parameter against ``in_shape``."""
    shape = _check_in_shape(in_shape)
    if not isinstance(spec, dict):
        _fail("operator", f"expected an object, got {type(spec).__name__}",
              'send {"kind": ..., ...parameters}')
    kind = spec.get("kind")
    if kind not in OPERATORS:
        raise UnknownKindError(f"operator.kind: unknown kind {kind!r}; send one of {sorted(OPERATORS)}")
    params = {k: v for k, v in spec.items() if k != "kind"}
    return kind, _VALIDATORS[kind](params, shape)


def build_operator(spec: dict, in_shape) -> Operator:
    """The operator a request's ``operator`` block describes, for images of shape ``in_shape``."""
    kind, kwargs = validate_operator_spec(spec, in_shape)
    return OPERATORS[kind](tuple(int(s) for s in in_shape), **kwargs)


# ----------------------------------------------------------------------------- schemas
_ARRAY = 'Array: nested list or {"npy": base64}'


def _schema(kind: str, description: str, properties: dict, required=(), **extra) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": kind,
        "description": description,
        "type": "object",
        "properties": {"kind": {"const": kind}, **properties},
        "required": ["kind", *required],
        "additionalProperties": False,
        **extra,
    }


def operator_schemas() -> dict[str, dict]:
    """JSON schema of each kind's parameters (``GET /v1/operators``)."""
    seed = {"type": "integer", "minimum": 0, "default": 0}
    odd = {"type": "integer", "minimum": 1, "description": "odd, at most min(H, W)"}
    return {
        "identity": _schema("identity", "Denoising: y = x. Observation [C,H,W].", {}),
        "inpainting": _schema(
            "inpainting", "y = mask * x; unobserved entries of y are ignored. Observation [C,H,W].",
            {"mask": {"description": f"{_ARRAY}; [H,W] or [C,H,W], 1 = observed, 0 = missing"}},
            ["mask"]),
        "sparse_points": _schema(
            "sparse_points", "y_n = x[channel_n, row_n, col_n]. Observation [N].",
            {"points": {"description": f"{_ARRAY}; [N,3] integer (channel, row, col), "
                                       "0-based; duplicates allowed"}},
            ["points"]),
        "blur": _schema(
            "blur", "True convolution with a centred odd kernel, each channel alike. "
                    "Exactly one of kernel, gaussian, motion. Observation [C,H,W].",
            {"kernel": {"description": f"{_ARRAY}; [k,k], k odd, nonzero sum, used as given"},
             "gaussian": {"type": "object", "additionalProperties": False, "required": ["sigma"],
                          "properties": {"sigma": {"type": "number", "exclusiveMinimum": 0},
                                         "size": {**odd, "description": "odd; default 2*ceil(3*sigma)+1"}}},
             "motion": {"type": "object", "additionalProperties": False, "required": ["size"],
                        "description": "random motion trajectory (deepinv MotionBlurGenerator), sum 1",
                        "properties": {"size": {**odd, "minimum": 3}, "seed": seed}},
             "boundary": {"enum": ["circular", "reflect"], "default": "circular"}},
            oneOf=[{"required": ["kernel"]}, {"required": ["gaussian"]}, {"required": ["motion"]}]),
        "super_resolution": _schema(
            "super_resolution", "Mean over each factor x factor block. Observation [C,H/f,W/f].",
            {"factor": {"type": "integer", "minimum": 1, "description": "must divide H and W"}},
            ["factor"]),
        "compressed_sensing": _schema(
            "compressed_sensing", "y = A vec(x), A [m, C*H*W]: Gaussian N(0, 1/m) drawn from seed "
                                  "(torch.Generator), or matrix given. Observation [m].",
            {"m": {"type": "integer", "minimum": 1, "description": "1..C*H*W; implied by matrix"},
             "seed": seed,
             "matrix": {"description": f"{_ARRAY}; [m, C*H*W], row-major (C, H, W) flattening"}},
            anyOf=[{"required": ["m"]}, {"required": ["matrix"]}]),
        "mri": _schema(
            "mri", "y = mask * FFT2(x), orthonormal FFT, numpy layout (DC at [0,0]); image C=1 real "
                   "or C=2 (real, imaginary). Observation [2,H,W] (real, imaginary).",
            {"mask": {"description": f"{_ARRAY}; [H,W], 1 = sampled k-space location"}},
            ["mask"]),
    }


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
        raise OperatorSpecError("pde: this model has no PDE; send pde: null")
    card_kind = defaults["kind"]
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        _fail("pde", f"expected an object, got {type(spec).__name__}", f'send {{"kind": "{card_kind}"}}')
    kind = spec.get("kind", card_kind)
    if kind not in PDE_RESIDUALS:
        raise UnknownKindError(f"pde.kind: unknown PDE {kind!r}; send {card_kind!r} (this model's PDE)")
    if kind != card_kind:
        raise OperatorSpecError(f"pde.kind: this model's PDE is {card_kind!r}, not {kind!r}; "
                                f'send {{"kind": "{card_kind}"}}')
    allowed = _PDE_PARAMS[kind]
    overrides = {k: v for k, v in spec.items() if k != "kind"}
    _keys(overrides, "pde", allowed)
    params = {**{k: v for k, v in defaults.items() if k in allowed}, **overrides}
    if n != m or n < 3:
        raise OperatorSpecError(f"pde: needs an N x N grid with N >= 3, the model is {n} x {m}")
    if "h" in defaults and not math.isclose(float(defaults["h"]), grid_spacing(n), rel_tol=1e-9):
        raise OperatorSpecError(f"pde: the card's h={defaults['h']} does not match 1/(N-1) "
                                f"for N={n}; fix the model card")
    kwargs: dict[str, Any] = {}
    channels = params.get("channels", (0, 1))
    if isinstance(channels, (str, bytes, dict)) or not hasattr(channels, "__len__") or len(channels) != 2:
        _fail("pde.channels", f"expected [a index, u index], got {channels!r}", "send two channel indices")
    channels = tuple(_integer(i, "pde.channels", minimum=0, maximum=c - 1) for i in channels)
    if channels[0] == channels[1]:
        _fail("pde.channels", "a and u are the same channel", "send two different indices")
    kwargs["channels"] = channels
    if kind == "darcy":
        kwargs["f"] = _number(params.get("f", 1.0), "pde.f")
    if kind == "helmholtz":
        kwargs["k"] = _number(params.get("k", 1.0), "pde.k", minimum=0)
    return PDE_RESIDUALS[kind]((c, n, m), **kwargs)
