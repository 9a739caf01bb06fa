"""Guided samplers (DPS, projection ALD, DiffusionPDE, fast) over shared solver cores."""
from .core import DivergedError
from .registry import METHODS, Method
from .params import Cost, SamplerConfig
from .samplers import (ALDConfig, DiffusionPDEConfig, DPSConfig, FastConfig,
                       sample_ald, sample_diffusion_pde, sample_dps, sample_fast)

__all__ = ["DivergedError", "METHODS", "Method", "ALDConfig", "Cost", "DiffusionPDEConfig", "DPSConfig",
           "FastConfig", "SamplerConfig", "sample_ald", "sample_diffusion_pde", "sample_dps", "sample_fast"]
