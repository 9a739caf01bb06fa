"""The one registry of sampling methods: name -> sampler function, frozen config, description.

A method's parameters are its config's fields, each declared with its meaning and range
(``guidance.params.param``); ``Method.make_config`` turns given values into a checked config,
and the config's ``check(operator, pde)`` holds the method's rules of fit to a problem.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .params import MethodError, SamplerConfig, per_channel
from .samplers import (ALDConfig, DiffusionPDEConfig, DPSConfig, FastConfig, Sampler, sample_ald,
                       sample_diffusion_pde, sample_dps, sample_fast)


def _coerce(config: type, f: dataclasses.Field, v: Any) -> Any:
    """A given value in the type of the field's default (per-channel weights: a tuple of floats)."""
    default = f.default
    if isinstance(v, (list, tuple)):
        if not per_channel(config, f.name):
            raise MethodError(f.name, "does not take a list", "one value")
        return tuple(float(e) for e in v)
    if isinstance(default, bool):
        return bool(v)
    if isinstance(default, int):
        if isinstance(v, bool) or not math.isfinite(float(v)) or float(v) != int(v):
            raise MethodError(f.name, "must be an integer", "a whole number")
        return int(v)
    if isinstance(default, float):
        return float(v)
    return v


@dataclass(frozen=True)
class Method:
    name: str
    sampler: Sampler
    config: type[SamplerConfig]
    summary: str
    paper: str

    def nfe_per_step(self, cfg: SamplerConfig) -> int:
        return cfg.nfe_per_step()

    def make_config(self, params: dict[str, Any] | None = None) -> SamplerConfig:
        """A frozen, checked config from given values; unknown names and bad values raise
        ``MethodError`` (a ``ValueError``)."""
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        unknown = sorted(set(params or {}) - set(fields))
        if unknown:
            raise MethodError(None, f"method {self.name!r} has no parameter(s) {unknown}",
                              f"only {sorted(fields)}")
        cfg = self.config(**{k: _coerce(self.config, fields[k], v) for k, v in (params or {}).items()})
        cfg.validate()
        return cfg

    def describe(self) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        return {"name": self.name, "summary": self.summary, "paper": self.paper,
                "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()},
                "nfe_per_step": self.nfe_per_step(self.config())}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fast", sample_fast, FastConfig,
           "Proximal data step on x0_hat + ancestral step; 1 network call per step (recommended).",
           "after DiffPIR (Zhu et al., CVPRW 2023), DDNM (Wang et al., ICLR 2023), PiGDM (Song et al., ICLR 2023)"),
    Method("dps", sample_dps, DPSConfig, "Diffusion Posterior Sampling: gradient of ||y - A(x0_hat)||.",
           "Chung et al., ICLR 2023"),
    Method("ald", sample_ald, ALDConfig, "Projection-based score annealed Langevin dynamics (linear operators).",
           "Song, Shen, Xing, Ermon, ICLR 2022; Jalal et al., NeurIPS 2021"),
    Method("diffusion_pde", sample_diffusion_pde, DiffusionPDEConfig,
           "EDM Heun sampler with observation and PDE-residual guidance.",
           "Huang, Yang, Wang, Park, NeurIPS 2024"),
)}
