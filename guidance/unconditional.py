"""Unconditional samples of a prior ``D(x, sigma)``: the one place that draws them.

    sigmas = get_sigmas("karras", 20, den.sigma_min, den.sigma_max)
    x = sample_unconditional(den, sigmas, 16, torch.Generator().manual_seed(0), "dpmpp_2m")

``x_0 ~ N(0, sigma_0^2 I)`` (the generator's first draw, so every solver starts from the same
noise for one seed), then one step per pair of levels, built from the cores in ``core``:

- ``euler``: the probability-flow ODE by Euler steps (first order, 1 network call a step);
- ``heun``: EDM's Heun steps (Karras et al. 2022; second order, 2 calls a step, the last step to
  sigma = 0 an Euler step with 1: ``2 n - 1`` calls for ``n`` steps);
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), an exponential integrator in log-SNR with a
  multistep second-order correction (1 call a step);
- ``ancestral``: DDPM-like stochastic steps (1 call a step; the prior part of ``fast``).

The state is float64 on the CPU and float32 on an accelerator (``core.state_dtype``) unless
``dtype`` says; samples are in the network's space (``LoadedModel.shift + scale * x`` maps back).
"""
from __future__ import annotations

import torch

from .core import (Callback, Progress, ancestral_step, dpmpp_2m_step, euler_step, heun_step, init_state, levels,
                   state_dtype)

SOLVERS = ("euler", "heun", "dpmpp_2m", "ancestral")


def _check(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, not {solver!r}")


def solver_nfe(solver: str, steps: int) -> int:
    """Network calls of ``steps`` steps of ``solver`` (Heun: ``2 steps - 1``)."""
    _check(solver)
    return 2 * steps - 1 if solver == "heun" else steps


def steps_for_nfe(solver: str, budget: int) -> int:
    """The most steps of ``solver`` whose network calls stay within ``budget`` (at least 1)."""
    _check(solver)
    return max(1, (budget + 1) // 2 if solver == "heun" else budget)


@torch.no_grad()
def sample_unconditional(denoiser, sigmas, num: int, generator, solver: str = "dpmpp_2m", *,
                         x: torch.Tensor | None = None, callback: Callback = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """``[num, *denoiser.shape]`` unconditional samples along ``sigmas`` (decreasing, ending in 0).

    ``generator`` draws the initial noise (and the fresh noise of ``ancestral``); ``x`` replaces
    that initial state when given (``num`` is then ignored). ``callback`` gets
    ``{i, total, sigma, x, x0_hat}`` after each step; a non-finite state raises
    ``core.DivergedError``.
    """
    _check(solver)
    sig = levels(sigmas)
    if x is None:
        x = init_state(num, denoiser.shape, sig[0], generator, device, state_dtype(device, dtype))
    n = len(sig) - 1
    prog = Progress(callback, n, x)
    x0_prev = None
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        if solver == "heun":
            x, x0 = heun_step(denoiser, x, s, s_next)
        else:
            x0 = denoiser(x, s)
            if solver == "euler":
                x = euler_step(x, x0, s, s_next)
            elif solver == "dpmpp_2m":
                x = dpmpp_2m_step(x, x0, s, s_next, x0_prev, sig[i - 1] if i > 0 else None)
                x0_prev = x0
            else:
                x = ancestral_step(x, x0, s, s_next, generator)
        prog(i, s, x, x0)
    return prog.done(x)
