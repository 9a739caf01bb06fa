"""The one registry of sampling methods: name -> sampler function, frozen config, description."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .samplers import (ALDConfig, DiffusionPDEConfig, DPSConfig, FastConfig, sample_ald,
                       sample_diffusion_pde, sample_dps, sample_fast)


@dataclass(frozen=True)
class Method:
    name: str
    sampler: Callable
    config: type
    summary: str
    paper: str

    def nfe_per_step(self, cfg) -> int:
        if self.name == "ald":
            return cfg.corrector_steps + 1
        return self.config.nfe_per_step

    def make_config(self, params: dict[str, Any] | None = None):
        """A frozen config from user parameters; unknown names and bad values raise ValueError."""
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
                if isinstance(v, bool) or float(v) != int(v):
                    raise ValueError(f"{k} must be an integer")
                params[k] = int(v)
            elif isinstance(default, float):
                params[k] = float(v)
        cfg = self.config(**params)
        validate_config(cfg)
        return cfg

    def describe(self) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        return {"name": self.name, "summary": self.summary, "paper": self.paper,
                "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()},
                "nfe_per_step": self.nfe_per_step(self.config())}


def validate_config(cfg) -> None:
    import math
    from models.schedules import SCHEDULES
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        vals = v if isinstance(v, tuple) else (v,)
        for e in vals:
            if isinstance(e, (int, float)) and not math.isfinite(float(e)):
                raise ValueError(f"{f.name} must be finite")
    if cfg.steps < 1:
        raise ValueError("steps must be at least 1")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}")
    for name in ("zeta", "zeta_pde", "lam", "snr", "eps", "eta", "late_obs_scale"):
        v = getattr(cfg, name, 0.0)
        if any(e < 0 for e in (v if isinstance(v, tuple) else (v,))):
            raise ValueError(f"{name} must be >= 0")
    if hasattr(cfg, "cg_iters") and not 1 <= cfg.cg_iters <= 50:
        raise ValueError("cg_iters must be between 1 and 50")
    if hasattr(cfg, "corrector_steps") and cfg.corrector_steps < 0:
        raise ValueError("corrector_steps must be >= 0")
    if hasattr(cfg, "step_rule") and cfg.step_rule not in ("snr", "eps"):
        raise ValueError("step_rule must be 'snr' or 'eps'")
    if hasattr(cfg, "lam") and cfg.lam == 0 and not hasattr(cfg, "corrector_steps"):
        raise ValueError("lam must be > 0")


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
