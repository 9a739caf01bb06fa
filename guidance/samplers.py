"""Guided reverse-diffusion samplers, one function each, sharing the cores in ``core.py``.

Signature (DESIGN.md contract 3)::

    sample_<method>(denoiser, operator, y, sigmas, *, config, generator, callback=None,
                    noise_sigma=0.0, pde=None) -> Tensor [B, C, H, W]

``y`` carries the batch: ``B = y.shape[0]`` posterior samples are drawn at once (each row
may hold its own observation). ``operator`` and ``pde`` act on the network-space state
(see ``operators.Rescaled``); ``sigmas`` is a decreasing schedule ending in 0. The state has
``y``'s dtype and device (``core.state_dtype_of``); the samplers read no tensor value on the
host inside a step (see ``core``), so on CUDA a step only queues work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from models.denoiser import Denoiser
from models.schedules import SCHEDULES
from operators.base import Operator, batch_dot

from .core import (Callback, Progress, SplitGenerator, ancestral_step, col, denoise_with_grad, dpmpp_2m_step,
                   heun_step, init_state, levels, randn_like, snr_step_size, state_dtype_of)
from .params import Cost, MethodError, SamplerConfig, param
from .terms import channel_masks, data_loss, measurement_consistency, pde_loss


def _start(operator, y, sigma0: float, generator):
    """The state at the first level, of the operator's image shape (a prior of another native size
    runs through ``models.tiling``)."""
    return init_state(y.shape[0], tuple(operator.in_shape), float(sigma0), generator, y.device, state_dtype_of(y))


def _begin(denoiser, operator, y, sigmas, config, generator, callback, pde):
    """What every sampler on a plain schedule starts with: the config's rules of fit, the levels,
    the state at the first level, and progress: ``(levels, x, steps, progress)``."""
    config.check(operator, pde)
    sig = levels(sigmas)
    x = _start(operator, y, sig[0], generator)
    return sig, x, len(sig) - 1, Progress(callback, len(sig) - 1, x)


def _channel_weights(zeta, operator, y):
    """``(weight, channel masks)``: a scalar weight (no masks) or one per channel (their count is
    ``SamplerConfig.check``'s) with the masks of each channel's part of the observation."""
    if isinstance(zeta, (int, float)):
        return float(zeta), None
    return tuple(float(z) for z in zeta), channel_masks(operator, y)


#: What a sampler draws its noise from: one generator, or one stream per problem of a batch.
Generator = torch.Generator | SplitGenerator


class Sampler(Protocol):
    """The seam between the driver and every method (``registry.Method.sampler``): the signature
    above, typed. Returns the samples, ``[B, C, H, W]`` in network space."""

    def __call__(self, denoiser: Denoiser, operator: Operator, y: torch.Tensor, sigmas: torch.Tensor, *,
                 config: "SamplerConfig", generator: Generator, callback: Callback = None,
                 noise_sigma: float = 0.0, pde: Operator | None = None) -> torch.Tensor: ...


# --------------------------------------------------------------------------- configs
#: The parameters several methods share, declared once.
def _steps(default: int):
    return param(default, "sampler steps (noise levels); null: the default", minimum=1, unit="steps")


def _schedule(default: str):
    return param(default, "noise schedule", choices=tuple(SCHEDULES))


def _zeta_pde(default: float):
    return param(default, "weight of the PDE-residual term (with a pde block)", minimum=0)


def _eta():
    return param(1.0, "fresh noise of the ancestral step: 1 = DDPM, 0 = DDIM", minimum=0)


def _zeta_obs(default: float):
    return param(default, "weight of the observation term: one number, or one per channel (needs an operator "
                 "that observes each channel separately)", minimum=0)


# --------------------------------------------------------------------------- DPS
@dataclass(frozen=True)
class DPSConfig(SamplerConfig):
    """DPS parameters (Chung et al. 2023). ``zeta`` is the paper's zeta' (a scalar, or one per
    channel, each weighing the norm of that channel's misfit); ``zeta_pde`` weighs the PDE term."""

    steps: int = _steps(1000)
    zeta: float | tuple[float, ...] = param(
        1.0, "DPS step size zeta' (the paper's): one number, or one per channel (each channel's misfit norm "
        "weighted; needs an operator that observes each channel separately)", minimum=0)
    zeta_pde: float = _zeta_pde(0.0)
    eta: float = _eta()
    schedule: str = _schedule("vp_linear")

    def nfe_per_step(self) -> int:
        return 1

    def cost(self) -> Cost:
        return Cost(self.steps, self.steps)  # one gradient through x0_hat per step


def sample_dps(denoiser: Denoiser, operator: Operator, y: torch.Tensor, sigmas: torch.Tensor, *,
               config: DPSConfig, generator: Generator, callback: Callback = None,
               noise_sigma: float = 0.0, pde: Operator | None = None) -> torch.Tensor:
    """Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye, ICLR 2023), Algorithm 1.

    Ancestral (DDPM) steps; after each, ``x -= zeta_i grad_x ||y - A(x0_hat(x))||^2`` with
    ``zeta_i = zeta / ||y - A(x0_hat)||``, i.e. ``2 zeta grad ||r||`` per sample. The step is
    taken in DDPM's VP coordinates, which in sigma-space multiplies it by
    ``sqrt((1 + sigma_i^2)(1 + sigma_{i+1}^2))``.
    """
    sig, x, n, prog = _begin(denoiser, operator, y, sigmas, config, generator, callback, pde)
    w, masks = _channel_weights(config.zeta, operator, y)

    def loss(x0):
        out = data_loss(operator, y, x0, w, masks)
        if pde is not None and config.zeta_pde:
            out = out + config.zeta_pde * pde_loss(pde, x0)
        return out

    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x0, _, grad = denoise_with_grad(denoiser, x, s, loss)
        vp = math.sqrt((1 + s ** 2) * (1 + s_next ** 2))
        x = ancestral_step(x, x0, s, s_next, generator, config.eta) - 2 * vp * grad
        prog(i, s, x, x0)
    return prog.done(x)


# --------------------------------------------------------------------------- ALD
@dataclass(frozen=True)
class ALDConfig(SamplerConfig):
    """Projection-based annealed Langevin parameters.

    ``steps`` noise levels, each with ``corrector_steps`` Langevin steps (``step_rule`` "snr":
    Song et al. 2021's signal-to-noise rule; "eps": ``eps * sigma_i^2 / sigma_L^2``) and a
    projection with mixing ``lam`` (1 = hard projection).
    """

    steps: int = _steps(200)
    corrector_steps: int = param(1, "Langevin corrector steps per noise level", minimum=0)
    final_corrector_steps: int = param(300, "Langevin corrector steps at the last noise level", minimum=0)
    snr: float = param(0.12, "signal-to-noise ratio of the Langevin step size (step_rule snr)", minimum=0)
    step_rule: str = param("snr", "Langevin step size: snr (Song et al. 2021) or eps (eps * sigma_i^2 / "
                           "sigma_L^2)", choices=("snr", "eps"))
    eps: float = param(2e-5, "Langevin step size constant (step_rule eps)", minimum=0)
    lam: float = param(1.0, "projection mixing (1 = hard projection)", minimum=0)
    zeta_pde: float = _zeta_pde(0.0)
    schedule: str = _schedule("ve")

    def check(self, operator: Operator, pde: Operator | None = None) -> None:
        super().check(operator, pde)
        if not operator.linear:
            raise MethodError(None, "ald needs a linear operator", "dps, diffusion_pde or fast")

    def exclusive(self, operator: Operator) -> bool:
        """Projection ALD works in the operator's SVD basis: only identical operators share it."""
        try:
            return bool(operator.linear and operator.svd() is not None)
        except Exception:  # noqa: BLE001 - an operator whose svd fails: share nothing
            return True

    def nfe_per_step(self) -> int:
        return self.corrector_steps + 1

    def cost(self) -> Cost:
        """An upper bound, exact when the matched level is inserted (noisy selections): then
        ``steps + 1`` levels of ``corrector_steps + 1`` calls, the inserted one running
        ``final_corrector_steps`` corrector steps instead. Without a matched level a run
        makes ``steps * nfe_per_step()`` calls. No backprops (the score is ``D(x) - x``)."""
        return Cost(self.steps * self.nfe_per_step() + self.final_corrector_steps + 1, 0)


def _with_level(sigmas: torch.Tensor, nu: float | None) -> torch.Tensor:
    """Insert the matched level ``nu`` into the schedule (if it falls strictly inside)."""
    if nu is None or nu <= 0 or nu >= float(sigmas[0]) or bool((sigmas == nu).any()):
        return sigmas
    s = torch.cat([sigmas, sigmas.new_tensor([nu])])
    return s.sort(descending=True).values


def sample_ald(denoiser: Denoiser, operator: Operator, y: torch.Tensor, sigmas: torch.Tensor, *,
               config: ALDConfig, generator: Generator, callback: Callback = None,
               noise_sigma: float = 0.0, pde: Operator | None = None) -> torch.Tensor:
    """Projection-based score ALD (Song, Shen, Xing, Ermon, ICLR 2022; Jalal et al. 2021).

    At each level ``sigma_i``: (1) project onto a noised measurement ``y_i`` drawn from
    ``p(A x_i | y)`` along one consistent path, with mixing ``lam``; (2) Langevin corrector
    steps, confined to what the measurement does not pin; (3) an ancestral predictor step.
    With noise ``sigma_y`` a mode seen with singular value ``s`` stands in for ``x_nu`` at
    ``nu = sigma_y / s``: it is pinned down to that level and evolves freely below it, which is
    exact for a Gaussian prior. Where all modes share one ``nu`` (selections) that level is
    inserted into the schedule and equilibrated with ``final_corrector_steps``.
    """
    config.check(operator, pde)
    match = measurement_consistency(operator, y, noise_sigma)
    nu = match.single_level()
    sig = levels(_with_level(torch.as_tensor(sigmas).detach().to("cpu", torch.float64), nu))
    x = _start(operator, y, sig[0], generator)
    n = len(sig) - 1
    prog = Progress(callback, n, x)
    s_last = sig[n - 1]
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x = match.project(x, s, config.lam, generator).to(x.dtype)  # (1) data consistency
        # (operators may work in float64, e.g. through an FFT basis: the state keeps its dtype)
        free = (lambda v, s=s: match.free_part(v, s).to(v.dtype)) if config.lam == 1.0 else None
        handoff = nu is not None and s == nu
        for _ in range(config.final_corrector_steps if handoff else config.corrector_steps):  # (2)
            score = (denoiser(x, s) - x) / s ** 2
            if pde is not None and config.zeta_pde:
                score = score - config.zeta_pde * _pde_grad(pde, x)
            z = randn_like(x, generator)
            if free is not None:
                score, z = free(score), free(z)
            step = (snr_step_size(score, z, config.snr) if config.step_rule == "snr"
                    else torch.full((x.shape[0],), config.eps * s ** 2 / s_last ** 2, dtype=x.dtype,
                                    device=x.device))
            x = x + col(step, x) * score + col(torch.sqrt(2 * step), x) * z
        x0 = denoiser(x, s)  # (3) predictor
        x = ancestral_step(x, x0, s, s_next, generator)
        prog(i, s, x, x0)
    return prog.done(x)


def _pde_grad(pde, x):
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(pde_loss(pde, xg).sum(), xg)
    return g


# --------------------------------------------------------------------------- DiffusionPDE
@dataclass(frozen=True)
class DiffusionPDEConfig(SamplerConfig):
    """DiffusionPDE parameters (Huang et al. 2024). ``zeta_obs`` is a scalar or one weight per
    channel; before ``pde_switch * steps`` only the observation term guides, after it the PDE
    term joins and the observation weight is multiplied by ``late_obs_scale``."""

    steps: int = _steps(2000)
    zeta_obs: float | tuple[float, ...] = _zeta_obs(5.0)
    zeta_pde: float = _zeta_pde(100.0)
    pde_switch: float = param(0.8, "fraction of the steps after which the PDE term joins")
    late_obs_scale: float = param(0.1, "observation weight multiplier after pde_switch", minimum=0)
    schedule: str = _schedule("karras")
    rho: float = param(7.0, "exponent of the Karras schedule")

    def nfe_per_step(self) -> int:
        return 2

    def cost(self) -> Cost:
        # Heun: two calls per step, the last (to sigma = 0) an Euler step with one; the guidance
        # gradient goes back through every call of its step
        n = 2 * self.steps - 1
        return Cost(n, n)


def sample_diffusion_pde(denoiser: Denoiser, operator: Operator, y: torch.Tensor, sigmas: torch.Tensor, *,
                         config: DiffusionPDEConfig, generator: Generator, callback: Callback = None,
                         noise_sigma: float = 0.0, pde: Operator | None = None) -> torch.Tensor:
    """DiffusionPDE (Huang, Yang, Wang, Park, NeurIPS 2024): EDM Heun steps guided by
    ``zeta_obs ||(y - A x0)|_c||`` per channel and ``zeta_pde ||R(x0)||``; the gradient is
    taken w.r.t. the step's start through the Heun-corrected ``x0_hat``."""
    sig, x, n, prog = _begin(denoiser, operator, y, sigmas, config, generator, callback, pde)
    w, masks = _channel_weights(config.zeta_obs, operator, y)
    switch = config.pde_switch * n
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        late = i > switch
        obs_scale = config.late_obs_scale if late else 1.0

        def step_and_loss(xc):
            xn, x0 = heun_step(denoiser, xc, s, s_next)  # x0: the corrector's (the last step: Euler's)
            loss = obs_scale * data_loss(operator, y, x0, w, masks)
            if late and pde is not None and config.zeta_pde:
                loss = loss + config.zeta_pde * pde_loss(pde, x0)
            return xn, x0, loss

        with torch.enable_grad():
            xc = x.detach().requires_grad_(True)
            xn, x0, loss = step_and_loss(xc)
            grad, = torch.autograd.grad(loss.sum(), xc)
        x = xn.detach() - grad
        prog(i, s, x, x0.detach())
    return prog.done(x)


# --------------------------------------------------------------------------- fast
#: The steps ``fast`` can take between noise levels (given the guided x0).
FAST_SOLVERS = ("ancestral", "dpmpp_2m")


@dataclass(frozen=True)
class FastConfig(SamplerConfig):
    """The project's fast sampler. ``lam`` scales the prior's weight in the proximal data step;
    ``eta`` the fresh noise of the ancestral step (1 = DDPM, 0 = DDIM); ``zeta_obs`` (scalar or
    per channel) and ``zeta_pde`` weigh the observation and PDE residuals in the Kalman step;
    ``noise_floor`` stands in for ``sigma_y`` there when the observation is noiseless;
    ``cg_iters`` conjugate-gradient iterations solve that step (1 = a line search; each one
    more costs one more backprop through the network, no more network evaluations; 0 = no
    Kalman step: only the closed-form proximal step of a linear operator, no backprop);
    ``solver`` the step from ``x_i`` to ``x_{i+1}`` given the guided ``x0``: ``ancestral`` (with
    ``eta``) or ``dpmpp_2m`` (DPM-Solver++(2M), deterministic: ``eta`` is not used)."""

    steps: int = _steps(30)
    lam: float = param(1.0, "weight of the prior in the proximal data step", above=0)
    eta: float = _eta()
    zeta_obs: float | tuple[float, ...] = _zeta_obs(1.0)
    zeta_pde: float = _zeta_pde(0.0)
    noise_floor: float = param(1e-2, "stands in for noise_sigma in the Kalman step when the observation is "
                               "noiseless", unit="the observation's units")
    cg_iters: int = param(1, "conjugate-gradient iterations of the Kalman step, 0..50 (each one backprop per "
                          "step; 0: no Kalman step, only the closed-form proximal step: linear operators "
                          "without a PDE term)", minimum=0, maximum=50)
    schedule: str = _schedule("karras")
    solver: str = param("ancestral", "the step between noise levels given the guided x0: ancestral (with "
                        "eta) or dpmpp_2m (DPM-Solver++(2M), deterministic; eta unused)", choices=FAST_SOLVERS)

    def check(self, operator: Operator, pde: Operator | None = None) -> None:
        super().check(operator, pde)
        if self.cg_iters == 0 and not self._affine(operator, pde):
            raise MethodError("cg_iters", "0 leaves only the proximal data step, which needs a linear operator "
                              "without a PDE term", "cg_iters >= 1")

    def _affine(self, operator: Operator, pde: Operator | None) -> bool:
        """Whether the data term is affine in x (a linear operator and no PDE term)."""
        return operator.linear and not (pde is not None and self.zeta_pde)

    def nfe_per_step(self) -> int:
        return 1

    def cost(self) -> Cost:
        return Cost(self.steps, self.steps * self.cg_iters)  # one backprop per CG iteration


def sample_fast(denoiser: Denoiser, operator: Operator, y: torch.Tensor, sigmas: torch.Tensor, *,
                config: FastConfig, generator: Generator, callback: Callback = None,
                noise_sigma: float = 0.0, pde: Operator | None = None) -> torch.Tensor:
    """Kalman guidance: one network call (and ``cg_iters`` backprops) per step.

    Our method, after PiGDM (Song, Vahdat, Mardani, Kautz, ICLR 2023) and DiffPIR / DDNM.
    Stack the whitened residuals ``F(u) = [sqrt(zeta_obs) (y - A u) / sigma_eff; sqrt(zeta_pde) R(u)]``
    and take ``d = -grad_u ||F||^2 / 2`` at ``u = x0_hat``. With ``C = sigma^2 J`` the covariance of
    ``x0`` given ``x_i`` (Tweedie; ``J`` the denoiser's Jacobian) the Kalman update moves along
    ``g = C d``; restricted to that line it is exact: the prior variance along ``g`` is
    ``1 / <d, g>``, so ``x0' = x0 + kappa g`` with
    ``kappa = -<F, F' g> / (||F' g||^2 + <d, g>)`` (``F' g`` a cheap JVP of the operator, no
    network). That line search is the first iteration of conjugate gradients on the whole
    Gaussian update; ``cg_iters > 1`` runs more (``kalman_cg``). Linear operators then take the proximal step
    ``argmin ||A u - y||^2 / sigma_y^2 + ||u - x0'||^2 / (lam r_i^2)`` (a projection when noiseless),
    ``r_i^2 = sigma_i^2 sd^2 / (sigma_i^2 + sd^2)``. Then an ancestral step towards ``x0'``, or
    (``solver`` ``dpmpp_2m``) a DPM-Solver++(2M) step, its ``D`` extrapolated from this step's and
    the previous step's guided ``x0'``.
    """
    sig, x, n, prog = _begin(denoiser, operator, y, sigmas, config, generator, callback, pde)
    sd2 = float(getattr(denoiser, "sigma_data", 0.5)) ** 2
    w, masks = _channel_weights(config.zeta_obs, operator, y)
    sigma_eff = max(float(noise_sigma), config.noise_floor)

    def residuals(u):
        r = (y - operator.forward(u)) / sigma_eff
        if isinstance(w, tuple):
            r = r * sum(float(wc) ** 0.5 * m for wc, m in zip(w, masks)) if masks is not None else r * w[0] ** 0.5
        else:
            r = r * w ** 0.5
        parts = [r.flatten(1)]
        if pde is not None and config.zeta_pde:
            parts.append(config.zeta_pde ** 0.5 * pde.residual(u).flatten(1))
        return torch.cat(parts, dim=1)

    affine = config._affine(operator, pde)
    x0_prev = s_prev = None  # the previous step's guided x0 (dpmpp_2m)
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        if config.cg_iters == 0:  # the closed-form data step alone: no backprop
            x0d = denoiser(x, s)
        else:
            x0d = _kalman_denoised(denoiser, x, s, residuals, config.cg_iters, affine)
        if operator.linear:
            r2 = s ** 2 * sd2 / (s ** 2 + sd2)
            x0d = (operator.project(x0d, y) if noise_sigma == 0
                   else operator.prox(x0d, y, noise_sigma ** 2 / (config.lam * r2))).to(x.dtype)
        if config.solver == "dpmpp_2m":
            x = dpmpp_2m_step(x, x0d, s, s_next, x0_prev, s_prev)
            x0_prev, s_prev = x0d, s
        else:
            x = ancestral_step(x, x0d, s, s_next, generator, config.eta)
        prog(i, s, x, x0d)
    return prog.done(x)


def _kalman_denoised(denoiser, x, s: float, residuals, cg_iters: int, affine: bool) -> torch.Tensor:
    """``D(x, s)`` moved by the Kalman update of the residuals (``kalman_cg``, ``cg_iters``
    backprops through the network for the prior covariance)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = denoiser(xg, s)
        u = x0.detach()

        def cov(v):  # C v = sigma^2 J^T v (one backprop through the network)
            gv, = torch.autograd.grad((x0 * v).sum(), xg, retain_graph=True)
            return s ** 2 * gv

        return u + kalman_cg(residuals, u, cov, cg_iters, affine)


def kalman_cg(residuals, u, cov, iters: int, affine: bool) -> torch.Tensor:
    """The Gaussian (Kalman) update ``delta = argmin delta^T C^-1 delta / 2 + ||F(u) + F' delta||^2 / 2``
    by conjugate gradients preconditioned with ``C`` (``cov``), ``iters`` iterations.

    Every search direction is ``p = C q`` with ``q`` known, so ``H p = (C^-1 + F'^T F') p
    = q + F'^T F' p`` needs no ``C^-1``. One iteration is the exact line search along
    ``g = C d`` (``d = -F'^T F``); each further one costs one more ``cov`` (a backprop) and
    converges to the full update in the Krylov space of ``C F'^T F'``. A sample whose
    curvature stops being positive (a Jacobian that is not PSD) keeps what it has.
    """
    f, vjp = _residual_and_vjp(residuals, u)

    def fprime(v):  # F' v
        return residuals(u + v) - f if affine else torch.func.jvp(residuals, (u,), (v,))[1]

    delta = torch.zeros_like(u)
    r = -vjp(f)  # -grad of the objective at delta = 0 (d)
    q = r
    p = cov(q)
    rz = batch_dot(r, p)
    for k in range(iters):
        fp = fprime(p)
        hp = q + vjp(fp)
        php = batch_dot(p, hp)
        ok = (php > 0) & (rz > 0)
        alpha = torch.where(ok, rz / php.clamp_min(1e-30), torch.zeros_like(rz))
        delta = delta + col(alpha, u) * p
        if k + 1 == iters:
            break
        r = r - col(alpha, u) * hp
        z = cov(r)
        rz_new = batch_dot(r, z)
        beta = torch.where(ok, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        q, p, rz = r + col(beta, u) * q, z + col(beta, u) * p, torch.where(ok, rz_new, torch.zeros_like(rz))
    return delta


def _residual_and_vjp(residuals, u):
    """``F(u)`` and ``w -> F'(u)^T w`` (no network involved)."""
    with torch.enable_grad():
        f, fn = torch.func.vjp(residuals, u.detach())
    return f.detach(), lambda w: fn(w)[0]
