"""Checks of operator parameters shared by every kind, and the error they raise. numpy only.

A failed check says which field was wrong, what was wrong and what is expected instead
(``OperatorSpecError(field, problem, expected)``); how that reads to a user is the caller's
(the service words it as a request error, ``str(e)`` as a library error).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

#: Largest seed accepted (torch.Generator takes 64-bit seeds).
MAX_SEED = 2**63 - 1


class OperatorSpecError(ValueError):
    """An invalid operator or PDE spec: ``field``, ``problem`` and what is ``expected`` instead
    (None where nothing better can be said; ``see_docs``: the parameters' documentation says)."""

    def __init__(self, field: str | None, problem: str, expected: str | None = None, *, see_docs: bool = False):
        self.field, self.problem, self.expected, self.see_docs = field, problem, expected, see_docs
        super().__init__(self.render("expected"))

    def render(self, verb: str, docs: str = "the parameters' documentation") -> str:
        """``<field>: <problem>; <verb> <expected>`` (``<verb> a value as <docs> describes``)."""
        head = f"{self.field}: {self.problem}" if self.field else self.problem
        if self.expected is None:
            return f"{head}; {verb} a value as {docs} describes" if self.see_docs else head
        return f"{head}; {verb} {self.expected}"


class UnknownKindError(OperatorSpecError):
    """The spec's ``kind`` is not in the registry."""


class Invalid(ValueError):
    """A parameter's problem and what is expected instead; raised inside spec models, reported
    with the field's path."""

    def __init__(self, problem: str, expected: str):
        super().__init__(f"{problem}; expected {expected}")
        self.problem, self.expected = problem, expected


def fail(field: str, problem: str, expected: str | None = None):
    """Raise ``OperatorSpecError(field, problem, expected)``."""
    raise OperatorSpecError(field, problem, expected)


def number(value, *, positive=False, minimum=None) -> float:
    """A finite real number (not a bool); raises ``Invalid``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise Invalid(f"expected a number, got {type(value).__name__}", "a JSON number")
    v = float(value)
    if not math.isfinite(v):
        raise Invalid("is NaN or infinite", "a finite number")
    if positive and v <= 0:
        raise Invalid(f"must be > 0, got {v:g}", "a positive number")
    if minimum is not None and v < minimum:
        raise Invalid(f"must be >= {minimum}, got {v:g}", f"a number >= {minimum}")
    return v


def integer(value, *, minimum=None, maximum=None) -> int:
    """An integer (an integral float such as 3.0 is accepted; bools are not); raises ``Invalid``."""
    v = number(value)
    if not v.is_integer():
        raise Invalid(f"expected an integer, got {v:g}", "a whole number")
    i = int(value) if isinstance(value, numbers.Integral) else int(v)
    if minimum is not None and i < minimum:
        raise Invalid(f"must be >= {minimum}, got {i}", f"an integer >= {minimum}")
    if maximum is not None and i > maximum:
        raise Invalid(f"must be <= {maximum}, got {i}", f"an integer <= {maximum}")
    return i


def checked(field: str, check, *args, **kwargs):
    """``check(*args, **kwargs)`` with an ``Invalid`` turned into an ``OperatorSpecError`` for ``field``."""
    try:
        return check(*args, **kwargs)
    except Invalid as e:
        fail(field, e.problem, e.expected)


def array(value, field: str) -> np.ndarray:
    """A finite numeric (or bool) array from a numpy array, tensor or nested lists (decoded:
    an encoded form is the caller's to decode first)."""
    if isinstance(value, (dict, str, bytes)) or value is None:
        fail(field, f"expected an array, got {type(value).__name__}", "a nested list of numbers or an array")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        fail(field, "is not a rectangular array", "a nested list with equal-length rows")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        fail(field, f"has non-numeric entries (dtype {arr.dtype})", "numbers only")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        fail(field, "contains NaN or inf", "finite numbers only")
    return arr


def binary(arr: np.ndarray, field: str) -> np.ndarray:
    """``arr`` as float64 0/1; anything else is an error."""
    if not np.isin(arr, (0, 1)).all():
        fail(field, "must be binary (0 or 1, or true/false)", "1 where observed/sampled and 0 elsewhere")
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
        raise OperatorSpecError(None, f"in_shape must be (C, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise OperatorSpecError(None, f"in_shape must be (C, H, W) of positive sizes, got {in_shape!r}")
    return shape
