"""The one registry of sampling methods: name -> sampler function, frozen config, description."""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from models.schedules import SCHEDULES

from .samplers import (FAST_SOLVERS, ALDConfig, DiffusionPDEConfig, DPSConfig, FastConfig, Sampler, SamplerConfig,
                       sample_ald, sample_diffusion_pde, sample_dps, sample_fast)


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
        """A frozen, validated config from user parameters; unknown names and bad values raise ValueError."""
        params = dict(params or {})
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {unknown}; "
                             f"its parameters are {sorted(fields)}")
        for k, v in list(params.items()):
            default = fields[k].default
            if isinstance(default, tuple) or (k in ("zeta_obs", "zeta") and isinstance(v, (list, tuple))):
                params[k] = tuple(float(e) for e in v) if isinstance(v, (list, tuple)) else float(v)
            elif isinstance(default, bool):
                params[k] = bool(v)
            elif isinstance(default, int):
                if isinstance(v, bool) or not math.isfinite(float(v)) or float(v) != int(v):
                    raise ValueError(f"{k} must be an integer")
                params[k] = int(v)
            elif isinstance(default, float):
                params[k] = float(v)
        cfg = self.config(**params)
        cfg.validate()
        return cfg

    def spec_model(self) -> type[BaseModel]:
        """The pydantic model of the request's ``method`` block for this method (``method_spec_model``)."""
        return method_spec_model(self)

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


# ----------------------------------------------------------------------------- request models
#: What each parameter does (shown in the OpenAPI schema); the configs' docstrings say more.
PARAM_DOCS = {
    "steps": "sampler steps (noise levels); null: the default",
    "zeta": "DPS step size zeta' (the paper's): one number, or one per channel (each channel's misfit "
            "norm weighted; needs an operator that observes each channel separately)",
    "zeta_obs": "weight of the observation term: one number, or one per channel (needs an operator that "
                "observes each channel separately)",
    "zeta_pde": "weight of the PDE-residual term (with a pde block)",
    "eta": "fresh noise of the ancestral step: 1 = DDPM, 0 = DDIM",
    "lam": "fast: weight of the prior in the proximal data step; ald: projection mixing (1 = hard projection)",
    "schedule": "noise schedule",
    "corrector_steps": "Langevin corrector steps per noise level",
    "final_corrector_steps": "Langevin corrector steps at the last noise level",
    "snr": "signal-to-noise ratio of the Langevin step size (step_rule snr)",
    "step_rule": "Langevin step size: snr (Song et al. 2021) or eps (eps * sigma_i^2 / sigma_L^2)",
    "eps": "Langevin step size constant (step_rule eps)",
    "pde_switch": "fraction of the steps after which the PDE term joins",
    "late_obs_scale": "observation weight multiplier after pde_switch",
    "rho": "exponent of the Karras schedule",
    "noise_floor": "stands in for noise_sigma in the Kalman step when the observation is noiseless",
    "solver": "fast: the step between noise levels given the guided x0: ancestral (with eta) or dpmpp_2m "
              "(DPM-Solver++(2M), deterministic; eta unused)",
    "cg_iters": "conjugate-gradient iterations of the Kalman step, 0..50 (each one backprop per step; 0: no Kalman step, only the closed-form proximal step: linear operators without a PDE term)",
}
#: Closed sets of string values, and integer bounds beyond ``steps >= 1``.
PARAM_CHOICES = {"schedule": tuple(SCHEDULES), "step_rule": ("snr", "eps"), "solver": FAST_SOLVERS}
PARAM_BOUNDS = {"steps": (1, None), "corrector_steps": (0, None), "final_corrector_steps": (0, None),
                "cg_iters": (0, 50)}


def _param_type(name: str, hint: Any, nonnegative: bool, positive: bool = False) -> Any:
    """The request type of a config field (a scalar type, or a union with per-channel tuples)."""
    if name in PARAM_CHOICES:
        return Literal[PARAM_CHOICES[name]]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else ()
    if args:
        parts = [_param_type(name, a, nonnegative, positive) for a in args]
        return typing.Union[tuple(parts)]
    if typing.get_origin(hint) is tuple:  # per-channel values: a JSON list
        inner = _param_type(name, typing.get_args(hint)[0], nonnegative, positive)
        return Annotated[list[inner], Field(min_length=1)]
    if hint is bool:
        return bool
    if hint is int:
        lo, hi = PARAM_BOUNDS.get(name, (0 if nonnegative else None, None))
        return Annotated[int, Field(ge=lo, le=hi)]
    if hint is float:
        return Annotated[float, Field(ge=0 if nonnegative else None, gt=0 if positive else None,
                                      allow_inf_nan=False)]
    if hint is type(None):
        return type(None)
    return hint if hint in (str,) else Any


@functools.cache
def method_spec_model(method: Method) -> type[BaseModel]:
    """``{"name": <method>, ...its parameters}``: each config field with its type and bounds (the
    config's own ``validate`` still has the last word), no default in the schema (an omitted
    parameter takes the model card's tuned value, else the config's default) and no other key."""
    hints = typing.get_type_hints(method.config)
    fields: dict[str, Any] = {"name": (Literal[method.name], Field(description="the method"))}
    for f in dataclasses.fields(method.config):
        typ = _param_type(f.name, hints[f.name], f.name in method.config.nonnegative,
                          f.name in method.config.positive)
        if f.name == "steps":
            typ = typing.Optional[typ]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        doc = PARAM_DOCS.get(f.name, f.name.replace("_", " "))
        fields[f.name] = (typ, Field(default_factory=lambda d=default: d,
                                     description=f"{doc}; default {default!r} (or the model card's tuned value)"))
    title = "".join(p.capitalize() for p in method.name.split("_")) + "Method"
    return create_model(title, __config__=ConfigDict(extra="forbid"),
                        __doc__=f"{method.summary} ({method.paper})", **fields)


def per_channel_weights_problem(config: SamplerConfig, operator) -> str | None:
    """Why ``config``'s per-channel weights cannot serve ``operator``, or None if they can.

    A per-channel weight (``zeta``, ``zeta_obs`` as a list) weighs the part of the misfit that
    each input channel produces; that part exists only when every observation entry depends on
    one channel (a linear, ``channel_separable`` operator). Equal weights are one number.
    """
    if operator.linear and operator.channel_separable:
        return None
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, tuple) and len(set(v)) > 1:
            return (f"{f.name}: per-channel weights {list(v)} need an operator whose observation entries each "
                    f"depend on one channel, and {operator.kind or type(operator).__name__} mixes channels; "
                    f"send one number for {f.name}")
    return None
