"""Score networks behind one contract ``D(x, sigma) -> x0_hat``; schedules; checkpoints; priors; training.

The package imports its submodules lazily (PEP 562): ``import models.cli_args`` or ``models.data``
does not import torch; ``models.Denoiser`` and the other names below import their module on first use.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "CountingDenoiser": "denoiser", "Denoiser": "denoiser", "EDMPrecond": "denoiser", "FlowDenoiser": "denoiser",
    "VEDenoiser": "denoiser", "VPDenoiser": "denoiser",
    "GRFDenoiser": "grf", "grf_spectrum": "grf",
    "get_sigmas": "schedules",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
