"""How a method declares its parameters: each field of its (frozen dataclass) config carries
a one-line meaning and its range, and ``check_config`` checks a config against them; the base
of every config (``SamplerConfig``: checks, rules of fit, cost).

``param(1.0, "weight of the prior", minimum=0)`` is a dataclass field whose metadata holds a
``Declared``; the service turns the declarations into its request schema, this module checks
them for every caller. No torch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from operators.base import Operator


class MethodError(ValueError):
    """A method's parameters, or their fit to a problem, are wrong: ``field`` (a parameter name,
    or None for the method as a whole), ``problem``, and what is ``expected`` instead."""

    def __init__(self, field: str | None, problem: str, expected: str | None = None):
        self.field, self.problem, self.expected = field, problem, expected
        super().__init__(self.render("expected"))

    def render(self, verb: str) -> str:
        """``<field>: <problem>; <verb> <expected>``."""
        head = f"{self.field}: {self.problem}" if self.field else self.problem
        return head if self.expected is None else f"{head}; {verb} {self.expected}"


@dataclass(frozen=True)
class Declared:
    """A parameter's meaning, unit and range: ``minimum <= v <= maximum``, ``v > above``, ``v``
    in ``choices`` (each element of a per-channel tuple alike). No unit: a pure number."""

    doc: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple | None = None
    unit: str | None = None


def param(default: Any, doc: str, **bounds) -> Any:
    """A config field with its declaration (``Declared``'s keywords)."""
    return dataclasses.field(default=default, metadata={"declared": Declared(doc, **bounds)})


def declared(f: dataclasses.Field) -> Declared:
    """The declaration of a config field (an undeclared one: its name as the meaning)."""
    return f.metadata.get("declared") or Declared(f.name.replace("_", " "))


@functools.cache
def per_channel(config_cls: type, name: str) -> bool:
    """Whether the field takes one value per channel (its type admits a tuple)."""
    hint = typing.get_type_hints(config_cls)[name]
    return any(typing.get_origin(a) is tuple for a in (hint, *typing.get_args(hint)))


def _check_value(name: str, v, d: Declared) -> None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(float(v)):
            raise MethodError(name, "must be finite", "a finite number")
        if d.minimum is not None and v < d.minimum:
            raise MethodError(name, f"must be >= {d.minimum:g}, got {v:g}", f"a value >= {d.minimum:g}")
        if d.maximum is not None and v > d.maximum:
            raise MethodError(name, f"must be <= {d.maximum:g}, got {v:g}", f"a value <= {d.maximum:g}")
        if d.above is not None and v <= d.above:
            raise MethodError(name, f"must be > {d.above:g}, got {v:g}", f"a value > {d.above:g}")
    if d.choices is not None and v not in d.choices:
        raise MethodError(name, f"{v!r} is not one of {list(d.choices)}", f"one of {list(d.choices)}")


def check_config(config) -> None:
    """Raise ``MethodError`` where a field of ``config`` is outside its declaration."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        for e in v if isinstance(v, tuple) else (v,):
            _check_value(f.name, e, declared(f))


@dataclass(frozen=True)
class Cost:
    """What one run costs per posterior sample (a batched call serves every row at once):
    network evaluations and backward passes through the network (vector-Jacobian products)."""

    network_calls: int
    backprops: int


class SamplerConfig:
    """What every method config shares. Subclasses are frozen dataclasses whose fields are
    declared with ``params.param`` (meaning and range); they say what a run costs (``cost``),
    calls per step (``nfe_per_step``), and add their own rules of fit to a problem (``check``)."""

    def validate(self) -> None:
        """Raise ``MethodError`` on a value outside its declared range."""
        check_config(self)

    def check(self, operator: "Operator", pde: "Operator | None" = None) -> None:
        """Raise ``MethodError`` where this config cannot serve ``operator`` (with the PDE term
        ``pde``). Per-channel weights (a tuple field) need one weight per channel, and, unless
        equal, an operator whose observation entries each depend on one channel (a linear,
        ``channel_separable`` one): only then does each channel's part of the misfit exist."""
        channels = operator.in_shape[0]
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, tuple):
                continue
            if len(v) != channels:
                raise MethodError(f.name, f"{len(v)} weights for a model with {channels} channels",
                                  f"one number or {channels} numbers")
            if len(set(v)) > 1 and not (operator.linear and operator.channel_separable):
                raise MethodError(f.name, f"per-channel weights {list(v)} need an operator whose observation "
                                  f"entries each depend on one channel, and {operator.kind or type(operator).__name__} "
                                  "mixes channels", f"one number for {f.name}")

    def exclusive(self, operator: "Operator") -> bool:
        """Whether only jobs with this very operator may share a run (default: any alike)."""
        return False

    def nfe_per_step(self) -> int:
        raise NotImplementedError

    def cost(self) -> Cost:
        raise NotImplementedError
