"""Shared solver cores in sigma-space (``x = x0 + sigma * n``): Euler, Heun, DPM-Solver++(2M), ancestral, Langevin.

Everything here is a small pure function; the samplers in this package compose them
with a guidance term. The state's dtype is the observation's (``state_dtype``: float64 on the
CPU, float32 on an accelerator, unless overridden); the network runs in its own dtype.

Device rules (CUDA): nothing inside a step waits for the device. Random numbers are drawn on
the state's device from per-job generators (``SplitGenerator``), the schedule is read into
Python floats once before the loop (``levels``), and the finiteness check is deferred
(``Progress``): a divergence is recorded on the device and read every ``CHECK_EVERY`` steps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Callback = Optional[Callable[[dict], None]]

#: On an accelerator, the deferred finiteness check is read (one synchronisation) this often.
CHECK_EVERY = 16


def state_dtype(device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The sampler state's dtype on ``device``: ``dtype`` when given ("float32", "float64" or a
    torch dtype), else float64 on the CPU (cheap there, and the exact-posterior checks want it)
    and float32 on an accelerator (float64 runs at a small fraction of float32 speed on GPUs;
    the network itself is float32 or lower anyway)."""
    if dtype is not None:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dt not in (torch.float32, torch.float64):
            raise ValueError(f"the state dtype must be float32 or float64, not {dtype}")
        return dt
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def state_dtype_of(y: torch.Tensor) -> torch.dtype:
    """The state dtype a sampler uses for the observation ``y``: ``y``'s own when it is float32
    or float64 (the driver casts ``y`` with ``state_dtype``), the device's default otherwise."""
    return y.dtype if y.dtype in (torch.float32, torch.float64) else state_dtype(y.device)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device``: random numbers are drawn where the state lives (no
    host-to-device copy per step). A seed's stream differs between the CPU and CUDA."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def levels(sigmas) -> list[float]:
    """The schedule as Python floats, read once before the loop (``float(sigmas[i])`` of a
    device tensor would wait for the device at every step)."""
    return torch.as_tensor(sigmas).detach().to("cpu", torch.float64).tolist()


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
        blocks = [torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=dtype, device=g.device)
                  for g, n in self.parts]
        # (each block on its generator's device: generators on the state's device copy nothing)
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).to(device)


def randn(shape, generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    if isinstance(generator, SplitGenerator):
        return generator.randn(shape, dtype, device)
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


def init_state(num: int, shape, sigma0: float, generator, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x_0 ~ N(0, sigma0^2 I)`` in ``dtype`` (float64 unless told)."""
    return sigma0 * randn((num,) + tuple(shape), generator, dtype, device)


def col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` tensor shaped to broadcast against ``x``."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


def to_d(x: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``dx/dsigma = (x - D(x)) / sigma`` (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from ``sigma`` to ``sigma_next`` given
    ``x0 = D(x, sigma)``: ``x + (sigma_next - sigma) (x - x0) / sigma`` (to ``sigma_next = 0``
    it lands on ``x0``, up to rounding). First order; one network call (the caller's)."""
    return x + (sigma_next - sigma) * to_d(x, sigma, x0)


def heun_step(denoiser, x: torch.Tensor, sigma, sigma_next, x0: torch.Tensor | None = None):
    """One EDM Heun step (Karras et al. 2022, Algorithm 1 without churn): an Euler predictor,
    then, unless ``sigma_next == 0``, the trapezoidal corrector with ``D(x_pred, sigma_next)``.

    ``x0 = D(x, sigma)`` when the caller has it (else it is evaluated here). Returns
    ``(x_next, x0_last)``: ``x0_last`` the last denoiser output, at ``sigma_next`` after a
    corrected step and at ``sigma`` after the final Euler one. Second order; two network calls
    per step, one for the last step to 0 (``2 n - 1`` for ``n`` steps).
    """
    if x0 is None:
        x0 = denoiser(x, sigma)
    d = to_d(x, sigma, x0)
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:  # the corrector
        x0 = denoiser(x_next, sigma_next)
        x_next = x + (sigma_next - sigma) * 0.5 * (d + to_d(x_next, sigma_next, x0))
    return x_next, x0


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
                  x0_prev: torch.Tensor | None = None, sigma_prev: float | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in sigma-space.

    The exponential integrator of the probability-flow ODE in ``lambda = -log sigma`` (half
    the log-SNR): with ``h = lambda_next - lambda``,
    ``x_next = (sigma_next / sigma) x - expm1(-h) D``, the linear part integrated exactly and
    ``D`` extrapolated linearly in ``lambda`` from this step's ``x0 = D(x, sigma)`` and the
    previous step's ``x0_prev`` (at ``sigma_prev``): with ``r = h_prev / h``,
    ``D = (1 + 1/(2r)) x0 - (1/(2r)) x0_prev``. Without ``x0_prev`` (the first step) it is the
    first-order update (DDIM), and the step to ``sigma_next = 0`` returns ``x0`` (its limit).
    Second order overall; one network call per step (the caller's). Python-float sigmas.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next == 0:
        return x0
    h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
    d = x0
    if x0_prev is not None and sigma_prev is not None:
        r = (math.log(float(sigma_prev)) - math.log(sigma)) / h  # h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (sigma_next / sigma) * x - math.expm1(-h) * d


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


def _diverged(step: int) -> DivergedError:
    return DivergedError(f"the sampler produced non-finite values at step {step}; "
                         "lower the guidance weight (zeta / lam) or use more steps")


def check_finite(x: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(x).all()):
        raise _diverged(step)


def report(callback: Callback, i: int, total: int, sigma, x, x0) -> None:
    """Check the state and tell the callback ``{i, total, sigma, x, x0_hat}`` (it may raise to cancel)."""
    check_finite(x, i)
    if callback is not None:
        callback({"i": i, "total": total, "sigma": float(sigma), "x": x, "x0_hat": x0})


class Progress:
    """A sampler's per-step report: the finiteness check, then the callback
    ``{i, total, sigma, x, x0_hat}`` (it may raise to cancel; ``sigma`` is a Python float).

    On the CPU the state is checked at every step, so a divergence stops the run at once (as
    ``report``). On an accelerator that check would wait for the device at every step: instead
    the first non-finite step is kept on the device (no synchronisation) and read every
    ``check_every`` steps and by ``done``, so a run stops at most that many steps late and the
    error still names the step where the state stopped being finite. The callback itself
    reads no tensor: what it does with ``x`` is its own affair.
    """

    def __init__(self, callback: Callback, total: int, x: torch.Tensor, check_every: int | None = None,
                 eager: bool | None = None):
        self.callback, self.total = callback, int(total)
        self.eager = x.device.type == "cpu" if eager is None else bool(eager)
        self.every = max(1, int(check_every or CHECK_EVERY))
        self.first_bad: torch.Tensor | None = None  # int64 0-d on the device; == total: all finite

    def __call__(self, i: int, sigma, x: torch.Tensor, x0: torch.Tensor) -> None:
        if self.eager:
            check_finite(x, i)
        else:
            bad = (~torch.isfinite(x).all()).long()
            step = self.total + bad * (i - self.total)  # i where non-finite, total otherwise
            self.first_bad = step if self.first_bad is None else torch.minimum(self.first_bad, step)
            if (i + 1) % self.every == 0:
                self.check()
        if self.callback is not None:
            self.callback({"i": i, "total": self.total, "sigma": float(sigma), "x": x, "x0_hat": x0})

    def check(self) -> None:
        """Raise ``DivergedError`` if a step so far left a non-finite state (one synchronisation)."""
        if self.first_bad is not None:
            k = int(self.first_bad)
            if k < self.total:
                raise _diverged(k)

    def done(self, x: torch.Tensor) -> torch.Tensor:
        """The final check; returns ``x``."""
        if not self.eager:
            self.check()
        return x


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
