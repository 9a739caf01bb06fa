"""What an operator spec may hold: the pydantic base of every kind's spec model, the parameter
types it is built from (numbers, integers, arrays) with the checks and messages they share, and
the spec errors. No torch.

A kind's spec model (``Operator.Spec``) is the request's ``operator`` block for that kind: its
JSON schema is what ``GET /v1/operators`` and the OpenAPI request schema show, and parsing a
spec with it (``OperatorSpec.parse``) checks everything that does not depend on the model's
shape. Shape checks are the kind's ``Operator.check_spec``. Every failure is an
``OperatorSpecError`` whose message reads ``<field>: <what was wrong>; <what to send instead>``.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Annotated, Any, get_args

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema

#: Largest seed accepted (torch.Generator takes 64-bit seeds).
MAX_SEED = 2**63 - 1


class OperatorSpecError(ValueError):
    """An invalid operator or PDE spec; the message says what to send instead."""


class UnknownKindError(OperatorSpecError):
    """The spec's ``kind`` is not in the registry (the service answers 404)."""


class Invalid(ValueError):
    """A parameter's problem and its fix; raised inside spec models, reported with the field's path."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


def fail(field: str, problem: str, fix: str):
    """Raise ``OperatorSpecError("<field>: <problem>; <fix>")``."""
    raise OperatorSpecError(f"{field}: {problem}; {fix}")


# ----------------------------------------------------------------------------- value checks
def number(value, *, positive=False, minimum=None) -> float:
    """A finite real number (not a bool); raises ``Invalid``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise Invalid(f"expected a number, got {type(value).__name__}", "send a JSON number")
    v = float(value)
    if not math.isfinite(v):
        raise Invalid("is NaN or infinite", "send a finite number")
    if positive and v <= 0:
        raise Invalid(f"must be > 0, got {v:g}", "send a positive number")
    if minimum is not None and v < minimum:
        raise Invalid(f"must be >= {minimum}, got {v:g}", f"send a number >= {minimum}")
    return v


def integer(value, *, minimum=None, maximum=None) -> int:
    """An integer (an integral float such as 3.0 is accepted; bools are not); raises ``Invalid``."""
    v = number(value)
    if not v.is_integer():
        raise Invalid(f"expected an integer, got {v:g}", "send a whole number")
    i = int(value) if isinstance(value, numbers.Integral) else int(v)
    if minimum is not None and i < minimum:
        raise Invalid(f"must be >= {minimum}, got {i}", f"send an integer >= {minimum}")
    if maximum is not None and i > maximum:
        raise Invalid(f"must be <= {maximum}, got {i}", f"send an integer <= {maximum}")
    return i


def checked(field: str, check, *args, **kwargs):
    """``check(*args, **kwargs)`` with an ``Invalid`` turned into an ``OperatorSpecError`` for ``field``."""
    try:
        return check(*args, **kwargs)
    except Invalid as e:
        fail(field, e.problem, e.fix)


def array(value, field: str) -> np.ndarray:
    """A finite numeric (or bool) array from a numpy array, tensor or nested lists (decoded:
    an encoded ``{"npy": ...}`` is the service's to decode first)."""
    if isinstance(value, (dict, str, bytes)) or value is None:
        fail(field, f"expected an array, got {type(value).__name__}",
             'send a nested list of numbers or {"npy": base64}')
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        fail(field, "is not a rectangular array", "send a nested list with equal-length rows")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        fail(field, f"has non-numeric entries (dtype {arr.dtype})", "send numbers only")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        fail(field, "contains NaN or inf", "send finite numbers only")
    return arr


def binary(arr: np.ndarray, field: str) -> np.ndarray:
    """``arr`` as float64 0/1; anything else is an error."""
    if not np.isin(arr, (0, 1)).all():
        fail(field, "must be binary (0 or 1, or true/false)", "send 1 where observed/sampled and 0 elsewhere")
    return arr.astype(np.float64)


def shape_str(shape) -> str:
    """``[a,b,c]`` of an array or a shape."""
    shape = getattr(shape, "shape", shape)
    return "[" + ",".join(str(int(s)) for s in shape) + "]"


def check_in_shape(in_shape) -> tuple[int, int, int]:
    """``(C, H, W)`` of positive sizes."""
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise OperatorSpecError(f"in_shape must be (C, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise OperatorSpecError(f"in_shape must be (C, H, W) of positive sizes, got {in_shape!r}")
    return shape


# ----------------------------------------------------------------------------- parameter types
#: The encodings of an array in a request (as ``service.schemas.ArrayIn``: the service decodes
#: them before the operator is built).
ENCODINGS = ("npy", "png", "tiff", "file")
_ENCODING_DOCS = {
    "npy": "base64 of a .npy file (numeric or bool dtype)",
    "png": "base64 of a PNG image: 8-bit / 255, 16-bit / 65535",
    "tiff": "base64 of a TIFF image: 8-bit / 255, 16-bit / 65535, float as is",
    "file": "in a multipart request: the name of the file part holding the array (.npy, .png, .tif)",
}

#: JSON schema of an array parameter: a nested list of numbers or one of the encodings.
ARRAY_SCHEMA: dict = {"anyOf": [
    {"type": "array", "items": {}, "description": "nested list of numbers"},
    *({"type": "object", "properties": {k: {"type": "string", "description": d}}, "required": [k],
       "additionalProperties": False} for k, d in _ENCODING_DOCS.items()),
]}


def _array_like(value):
    """Structure only (shape and values are ``check_spec``'s): a list, an array or tensor, or an
    encoding the service decodes (``{"npy": "<base64>"}`` and the like)."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in ENCODINGS and isinstance(next(iter(value.values())), str):
            return value
        raise Invalid("is not an array encoding",
                      'send a nested list of numbers or one of {"npy"|"png"|"tiff"|"file": "<string>"}')
    if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "__array__"):
        return value
    raise Invalid(f"expected an array, got {type(value).__name__}",
                  'send a nested list of numbers or {"npy": "<base64>"}')


class _ArrayMarker:
    """Marks a field as an array (``OperatorSpec.array_fields``)."""


#: An array parameter (nested list, numpy array, tensor, or an encoding before the service decodes it).
Array = Annotated[Any, _ArrayMarker(), BeforeValidator(_array_like), WithJsonSchema(ARRAY_SCHEMA)]


def Number(*, positive: bool = False, minimum: float | None = None):  # noqa: N802 - a type
    """A finite number (not a bool), optionally ``> 0`` or ``>= minimum``."""
    schema: dict = {"type": "number"}
    if positive:
        schema["exclusiveMinimum"] = 0
    if minimum is not None:
        schema["minimum"] = minimum
    return Annotated[float, BeforeValidator(lambda v: number(v, positive=positive, minimum=minimum)),
                     WithJsonSchema(schema)]


def Integer(*, minimum: int | None = None, maximum: int | None = None):  # noqa: N802 - a type
    """An integer (an integral float such as 3.0 is accepted; bools are not) in ``[minimum, maximum]``."""
    schema: dict = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return Annotated[int, BeforeValidator(lambda v: integer(v, minimum=minimum, maximum=maximum)),
                     WithJsonSchema(schema)]


#: A seed for the server's draws (``torch.Generator``): 0 .. 2^63 - 1.
Seed = Integer(minimum=0, maximum=MAX_SEED)


# ----------------------------------------------------------------------------- spec models
class SpecModel(BaseModel):
    """A closed object of parameters (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


class OperatorSpec(SpecModel):
    """The base of every kind's spec model: ``{"kind": <Literal>, ...parameters}``."""

    @classmethod
    def kind_name(cls) -> str:
        """The value of ``kind`` (the ``Literal`` of its annotation)."""
        return get_args(cls.model_fields["kind"].annotation)[0]

    @classmethod
    def array_fields(cls) -> tuple[str, ...]:
        """The parameters that hold arrays (the service decodes these)."""
        return tuple(name for name, f in cls.model_fields.items()
                     if any(isinstance(m, _ArrayMarker) for m in f.metadata)
                     or any(isinstance(m, _ArrayMarker) for a in get_args(f.annotation)
                            for m in getattr(a, "__metadata__", ())))

    @classmethod
    def parse(cls, spec: Any, where: str = "operator") -> "OperatorSpec":
        """The spec checked for everything that does not depend on the image shape."""
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict):
            fail(where, f"expected an object, got {type(spec).__name__}",
                 f'send {{"kind": "{cls.kind_name()}", ...parameters}}')
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            raise OperatorSpecError(spec_message(e, cls, where)) from None

    def parameters(self) -> dict:
        """The parameters as given (without ``kind``; nested models as dicts, arrays untouched)."""
        return {k: v for k, v in _plain(self).items() if k != "kind"}


def _plain(v):
    return {k: _plain(getattr(v, k)) for k in type(v).model_fields} if isinstance(v, SpecModel) else v


# ----------------------------------------------------------------------------- messages
_SAFE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}|\d{1,9}")


def _safe(part) -> str:
    """A location part as it may be shown: short identifiers and indices only (never echo input)."""
    s = str(part)
    return s if _SAFE.fullmatch(s) else "<field>"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The (nested) spec model found at ``loc`` inside ``model``."""
    for part in loc:
        f = model.model_fields.get(str(part))
        if f is None:
            return None
        sub = [a for a in (f.annotation, *get_args(f.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return None
        model = sub[0]
    return model


def _params(model: type[BaseModel] | None) -> list[str]:
    return sorted(k for k in (model.model_fields if model else {}) if k != "kind")


def _clean(loc: tuple, model: type[BaseModel]) -> tuple:
    """``loc`` without pydantic's union-branch labels: field names (of nested models too) and indices."""
    out, current = [], model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif current is not None and part in current.model_fields:
            out.append(part)
            current = _model_at(current, (part,))
    return tuple(out)


def spec_message(err: ValidationError, model: type[BaseModel], where: str,
                 docs: str = "GET /v1/operators") -> str:
    """The first problem of a spec (unknown and missing parameters grouped), never echoing input;
    ``docs`` is where the parameters are described."""
    errors = [dict(e, loc=_clean(tuple(e["loc"]), model) if e["type"] not in ("extra_forbidden",) else
                   (*_clean(tuple(e["loc"][:-1]), model), e["loc"][-1]))
              for e in err.errors(include_url=False)]
    for group, problem in (("extra_forbidden", "unknown parameter(s)"), ("missing", "missing parameter(s)")):
        hits = [e for e in errors if e["type"] == group]
        if hits:
            parent = tuple(hits[0]["loc"][:-1])
            names = sorted({_safe(e["loc"][-1]) for e in hits if tuple(e["loc"][:-1]) == parent})
            field = ".".join([where, *map(_safe, parent)])
            allowed = _params(_model_at(model, parent))
            fix = (f"send only {allowed}" if allowed else "send no parameters besides kind") \
                if group == "extra_forbidden" else f"send {names}"
            return f"{field}: {problem} {names}; {fix}"
    e = errors[0]
    field = ".".join([where, *map(_safe, e["loc"])])
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        return f"{field}: {cause.problem}; {cause.fix}"
    kind = e["type"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        allowed = _params(_model_at(model, tuple(e["loc"])))
        return f"{field}: expected an object, got {type(e.get('input')).__name__}; " \
               f"send an object with keys {allowed}"
    if kind == "literal_error":
        return f"{field}: unknown value; send {(e.get('ctx') or {}).get('expected', 'one of the listed values')}"
    if cause is not None:
        return f"{field}: {cause}"
    return f"{field}: {e.get('msg', 'invalid')}; send a value as {docs} describes"
