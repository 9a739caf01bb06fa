"""The one registry of sampling methods: name -> sampler function, frozen config, description."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .samplers import (ALDConfig, DiffusionPDEConfig, DPSConfig, FastConfig, SamplerConfig,
                       sample_ald, sample_diffusion_pde, sample_dps, sample_fast)


@dataclass(frozen=True)
class Method:
    name: str
    sampler: Callable
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
