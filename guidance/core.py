"""Shared solver cores in sigma-space (``x = x0 + sigma * n``): Euler, Heun, ancestral, Langevin.

Everything here is a small pure function; the samplers in this package compose them
with a guidance term. State is float64; the network runs in its own dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Callback = Optional[Callable[[dict], None]]


class DivergedError(RuntimeError):
    """A sampler produced a non-finite state; the run is stopped."""


class SplitGenerator:
    """One random stream per block of the batch, so that jobs batched together draw exactly
    the noise they would draw alone: ``SplitGenerator([(gen_a, 2), (gen_b, 3)])`` for B = 5."""

    def __init__(self, parts: list[tuple[torch.Generator, int]]):
        self.parts = parts

    def randn(self, shape, dtype, device) -> torch.Tensor:
        if sum(n for _, n in self.parts) != shape[0]:
            raise ValueError("SplitGenerator blocks do not add up to the batch size")
        return torch.cat([torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=dtype, device=g.device)
                          for g, n in self.parts]).to(device)


def randn(shape, generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    if isinstance(generator, SplitGenerator):
        return generator.randn(shape, dtype, device)
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


def init_state(num: int, shape, sigma0: float, generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``x_0 ~ N(0, sigma0^2 I)`` in float64."""
    return sigma0 * randn((num,) + tuple(shape), generator, torch.float64, device)


def col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` tensor shaped to broadcast against ``x``."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


def to_d(x: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``dx/dsigma = (x - D(x)) / sigma`` (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0):
    """Split ``sigma -> sigma_next`` into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    With ``eta = 1`` this is DDPM's posterior step (Ho et al. 2020) in sigma-space.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(float(sigma_next), eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    down = (sigma_next ** 2 - up ** 2) ** 0.5
    return float(down), float(up)


def ancestral_step(x, x0, sigma, sigma_next, generator, eta: float = 1.0):
    down, up = ancestral_sigmas(float(sigma), float(sigma_next), eta)
    x = x + (down - sigma) * to_d(x, sigma, x0)
    return x + up * randn_like(x, generator) if up > 0 else x


def snr_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float) -> torch.Tensor:
    """Song et al. 2021 corrector rule, per sample: ``step = 2 (snr ||z|| / ||score||)^2``."""
    grad_norm = score.flatten(1).norm(dim=1).clamp_min(1e-30)
    return 2 * (snr * noise.flatten(1).norm(dim=1) / grad_norm) ** 2


def check_finite(x: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DivergedError(f"the sampler produced non-finite values at step {step}; "
                            "lower the guidance weight (zeta / lam) or use more steps")


def report(callback: Callback, i: int, total: int, sigma, x, x0) -> None:
    """Check the state and tell the callback ``{i, total, sigma, x, x0_hat}`` (it may raise to cancel)."""
    check_finite(x, i)
    if callback is not None:
        callback({"i": i, "total": total, "sigma": float(sigma), "x": x, "x0_hat": x0})


def per_sample_norm(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).norm(dim=1)


def denoise_with_grad(denoiser, x: torch.Tensor, sigma, loss_fn):
    """``x0 = D(x, sigma)``, per-sample ``loss_fn(x0) -> [B]`` and its gradient w.r.t. ``x``.

    Each sample's loss depends only on its own ``x``, so the gradient of the sum is
    the per-sample gradient (never pooled over the batch).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = denoiser(xg, sigma)
        losses = loss_fn(x0)
        grad, = torch.autograd.grad(losses.sum(), xg)
    return x0.detach(), losses.detach(), grad
