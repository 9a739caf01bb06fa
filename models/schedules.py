"""Noise schedules as tensors in sigma-space (``x = x0 + sigma * noise``).

Every function returns ``n + 1`` decreasing sigmas ending with an appended ``0``
(the clean end), as k-diffusion does. No stateful scheduler objects.
"""
from __future__ import annotations

import math

import torch


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM) eq. 5: uniform in ``sigma^(1/rho)``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def get_sigmas_ve_geometric(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Song & Ermon (NCSN / VE SDE): geometric sequence from sigma_max to sigma_min."""
    return _append_zero(torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n,
                                                 dtype=torch.float64)))


def vp_sigma(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """VP SDE with linear beta(t): ``sigma(t) = sqrt(exp(beta_min t + (beta_max-beta_min) t^2/2) - 1)``."""
    return torch.sqrt(torch.expm1(beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2))


def get_sigmas_vp_linear(n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                         beta_min: float = 0.1, beta_max: float = 20.0, eps_t: float = 1e-3) -> torch.Tensor:
    """Song et al. 2021 VP SDE (DDPM's linear betas), uniform in t from 1 to ``eps_t``.

    ``sigma_min`` / ``sigma_max`` clip the result to a model's trained range.
    """
    t = torch.linspace(1.0, eps_t, n, dtype=torch.float64)
    s = vp_sigma(t, beta_min, beta_max)
    if sigma_min is not None or sigma_max is not None:
        s = s.clamp(min=sigma_min or 0.0, max=sigma_max or math.inf)
    return _append_zero(s)


def get_sigmas_vp_cosine(n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                         s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 cosine schedule: ``alpha_bar(t) = cos^2((t+s)/(1+s) pi/2)`` (normalized)."""
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = (f(t) / f(torch.zeros(1, dtype=torch.float64))).clamp(1e-8, 1.0)
    sig = torch.sqrt(1 / abar - 1)
    if sigma_min is not None or sigma_max is not None:
        sig = sig.clamp(min=sigma_min or 0.0, max=sigma_max or math.inf)
    return _append_zero(sig)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Discrete DDPM timesteps in sigma-space: ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (increasing in t)."""
    a = alphas_cumprod.to(torch.float64)
    return torch.sqrt((1 - a) / a)


def ddpm_linear_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM (Ho et al. 2020) / guided-diffusion linear beta schedule's ``alpha_bar``."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


SCHEDULES = {
    "karras": get_sigmas_karras,
    "ve": get_sigmas_ve_geometric,
    "vp_linear": get_sigmas_vp_linear,
    "vp_cosine": get_sigmas_vp_cosine,
}


def get_sigmas(name: str, n: int, sigma_min: float, sigma_max: float, **kw) -> torch.Tensor:
    """Look a schedule up by name and build ``n`` steps within ``[sigma_min, sigma_max]``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {sorted(SCHEDULES)}")
    if n < 1:
        raise ValueError("a schedule needs at least 1 step")
    return SCHEDULES[name](n, sigma_min, sigma_max, **kw)
