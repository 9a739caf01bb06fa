"""The declarations an operator kind's parameters are made of: the base of every kind's spec
model, and the parameter types (numbers, integers, arrays) with their ranges and checks.

A kind's spec model (``Operator.Spec``) declares the parameters of the kind (typed, with ranges
and one-line meanings); parsing a spec with it (``OperatorSpec.parse``) checks everything that
does not depend on the image shape. Shape checks are the kind's ``Operator.check_spec``. Every
failure is an ``OperatorSpecError`` (field, problem, what is expected instead).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, get_args

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema

from .checks import (MAX_SEED, Invalid, OperatorSpecError, UnknownKindError, array, binary,  # noqa: F401
                     check_in_shape, checked, fail, integer, number, shape_str)


# ----------------------------------------------------------------------------- parameter types
def _array_like(value):
    """Structure only (shape and values are ``check_spec``'s): a list, an array or a tensor."""
    if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "__array__"):
        return value
    raise Invalid(f"expected an array, got {type(value).__name__}", "a nested list of numbers or an array")


class _ArrayMarker:
    """Marks a field as an array (``OperatorSpec.array_fields``)."""


#: An array parameter (nested list, numpy array or tensor). Callers that receive arrays in another
#: form (an encoded upload) derive a model whose array fields take that form (``array_fields``).
Array = Annotated[Any, _ArrayMarker(), BeforeValidator(_array_like)]


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
                 f'{{"kind": "{cls.kind_name()}", ...parameters}}')
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            raise spec_error(e, cls, where) from None

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


def spec_error(err: ValidationError, model: type[BaseModel], where: str) -> OperatorSpecError:
    """The first problem of a spec (unknown and missing parameters grouped), never echoing input.
    ``expected`` is None where only the parameters' documentation can say more."""
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
            expected = (f"only {allowed}" if allowed else "no parameters besides kind") \
                if group == "extra_forbidden" else f"{names}"
            return OperatorSpecError(field, f"{problem} {names}", expected)
    e = errors[0]
    field = ".".join([where, *map(_safe, e["loc"])])
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        return OperatorSpecError(field, cause.problem, cause.expected)
    kind = e["type"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        allowed = _params(_model_at(model, tuple(e["loc"])))
        return OperatorSpecError(field, f"expected an object, got {type(e.get('input')).__name__}",
                                 f"an object with keys {allowed}")
    if kind == "literal_error":
        return OperatorSpecError(field, "unknown value",
                                 (e.get("ctx") or {}).get("expected", "one of the listed values"))
    if cause is not None:
        return OperatorSpecError(field, str(cause))
    return OperatorSpecError(field, e.get("msg", "invalid"), see_docs=True)
