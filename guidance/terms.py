"""Guidance terms shared by the samplers: data-fit and PDE-residual losses, noise-matched projections."""
from __future__ import annotations

import torch

from .core import per_sample_norm, randn, randn_like


def channel_masks(operator, y: torch.Tensor) -> list[torch.Tensor] | None:
    """For each input channel ``c``, the observation entries that depend on it (``|A| e_c != 0``).

    Used to weight the data term per channel (DiffusionPDE's ``zeta_a``, ``zeta_u``).
    Returns None when the operator mixes channels.
    """
    if not getattr(operator, "channel_separable", False) or not operator.linear:
        return None
    c = operator.in_shape[0]
    masks = []
    for k in range(c):
        e = torch.zeros((1,) + operator.in_shape, dtype=y.dtype, device=y.device)
        e[:, k] = 1.0
        masks.append((operator.forward(e).abs() > 0).to(y.dtype))
    return masks


def data_loss(operator, y: torch.Tensor, x0: torch.Tensor, weights=None, masks=None) -> torch.Tensor:
    """Per-sample ``sum_c w_c ||(y - A x0)|_c||`` (or ``w ||y - A x0||`` for a scalar weight)."""
    r = y - operator.forward(x0)
    if masks is None or weights is None or isinstance(weights, (int, float)):
        w = 1.0 if weights is None else float(weights if isinstance(weights, (int, float)) else weights[0])
        return w * per_sample_norm(r)
    terms = [float(w) * per_sample_norm(r * m) for w, m in zip(weights, masks) if w]
    # every weight 0: no data term, but still a per-sample tensor in the graph (gradient 0)
    return sum(terms) if terms else 0.0 * r.flatten(1).sum(1)


def pde_loss(pde, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean-square-root PDE residual ``||R(x0)|| / sqrt(#nodes)``."""
    r = pde.residual(x0)
    return per_sample_norm(r) / r[0].numel() ** 0.5


def matched_noise_level(operator, noise_sigma: float) -> float | None:
    """``nu = sigma_y / sqrt(c)`` when ``A A^T = c I``: the diffusion level at which ``A x_nu`` is
    distributed exactly as the noisy observation (so ``y`` can stand in for ``A x_nu``)."""
    c = getattr(operator, "row_gram", None)
    if c is None:
        return None
    return float(noise_sigma) / float(c) ** 0.5


def measurement_path(operator, y, sigma: float, prev, noise_sigma: float, generator):
    """The noised measurement ``y_sigma``, a draw of ``A x_sigma`` given ``y``, along one path.

    ``y_sigma = y + b(sigma)`` where ``b`` is the forward noise seen through ``A``: a Brownian
    motion in variance ``v = sigma^2 - nu^2`` (``nu`` the matched level, 0 if none), pinned to
    0 at ``v = 0``. Going down in sigma, ``b`` is drawn from its bridge given the previous value
    ``prev = (v, b)``, so successive levels see one consistent trajectory (not fresh noise each
    level, which would decorrelate the observed and unobserved parts). Returns ``(y_sigma, state)``.
    """
    nu = matched_noise_level(operator, noise_sigma) or 0.0
    v = max(sigma ** 2 - nu ** 2, 0.0)
    if v == 0:
        return y, (0.0, torch.zeros_like(y))
    az = operator.forward(randn((y.shape[0],) + operator.in_shape, generator, y.dtype, y.device))
    if prev is None:
        b = v ** 0.5 * az
    else:  # bridge: b(v) | b(v_prev) ~ N(v/v_prev b_prev, v (1 - v/v_prev))
        v_prev, b_prev = prev
        ratio = v / v_prev
        b = ratio * b_prev + (v * max(1 - ratio, 0.0)) ** 0.5 * az
    return y + b, (v, b)


def soft_project(operator, x, y_hat, sigma: float, noise_sigma: float, lam: float) -> torch.Tensor:
    """Data consistency with mixing ``lam``.

    Noiseless or matched (``A A^T = c I``): ``x + lam A^+ (y_hat - A x)``, an exact projection at
    ``lam = 1``. Otherwise the Gaussian (Kalman) update of a state with uncertainty ``sigma^2``
    by a measurement with noise ``sigma_y^2``: ``x + lam sigma^2 A^T (sigma^2 A A^T + sigma_y^2)^{-1}(y_hat - A x)``,
    via ``prox`` (same thing, written in the input space).
    """
    if noise_sigma == 0 or matched_noise_level(operator, noise_sigma) is not None:
        return x + lam * operator.pseudo_inverse(y_hat - operator.forward(x))
    rho = (noise_sigma / sigma) ** 2
    return x + lam * (operator.prox(x, y_hat, rho) - x)


def null_space(operator, v: torch.Tensor) -> torch.Tensor:
    """``(I - A^+ A) v``: the part of ``v`` the observation does not see."""
    return v - operator.pseudo_inverse(operator.forward(v))




class SpectralConsistency:
    """Per-mode measurement matching in the operator's SVD basis (after SNIPS, Kawar et al. 2021,
    and DDRM, Kawar et al. 2022). Mode ``k`` observes ``m_k = (U^T y)_k / s_k = (V^T x0)_k + nu_k e``
    with ``nu_k = sigma_y / s_k``; while ``sigma >= nu_k`` the mode is set to ``m_k + b_k`` with
    ``b_k`` the bridge path of variance ``sigma^2 - nu_k^2``; below ``nu_k`` it evolves freely.
    Exact for a Gaussian prior diagonal in the same basis."""

    def __init__(self, svd, y: torch.Tensor, noise_sigma: float):
        self.svd = svd
        s = svd.s.to(y.device)
        self.observed = s > 0
        safe = torch.where(self.observed, s, torch.ones_like(s))
        self.m = svd.ut(y) / safe
        self.nu = torch.where(self.observed, noise_sigma / safe, torch.full_like(s, float("inf")))
        self.v_prev, self.b = None, None

    def active(self, sigma: float) -> torch.Tensor:
        return sigma >= self.nu

    def project(self, x, sigma: float, lam: float, generator) -> torch.Tensor:
        act = self.active(sigma)
        v = torch.where(act, sigma ** 2 - self.nu ** 2, torch.zeros_like(self.nu)).clamp_min(0)
        z = self.svd.vt(randn_like(x, generator))
        if self.b is None:
            b = v.sqrt() * z
        else:  # bridge from the previous level where the mode was already active
            was = self.v_prev > 0
            ratio = torch.where(was, v / torch.where(was, self.v_prev, torch.ones_like(v)), torch.zeros_like(v))
            b = torch.where(was, ratio * self.b + (v * (1 - ratio).clamp_min(0)).sqrt() * z, v.sqrt() * z)
        self.v_prev, self.b = v, b
        c = self.svd.vt(x)
        target = self.m + b
        return x + self.svd.v(torch.where(act, lam * (target - c), torch.zeros_like(c)))

    def single_level(self) -> float | None:
        """The matched level when every observed mode shares one (None otherwise)."""
        nu = self.nu[self.observed]
        if nu.numel() == 0 or not bool(torch.isfinite(nu).all()):
            return None
        lo, hi = float(nu.min()), float(nu.max())
        return lo if hi - lo <= 1e-12 * max(hi, 1.0) else None

    def free_part(self, vec, sigma: float) -> torch.Tensor:
        """The part of ``vec`` in modes the measurement does not pin at this level."""
        c = self.svd.vt(vec)
        return self.svd.v(torch.where(self.active(sigma), torch.zeros_like(c), c))


class PathConsistency:
    """Measurement matching without an SVD: one consistent noise path of ``A x_sigma`` given ``y``
    (exact for ``A A^T = c I`` down to ``nu = sigma_y / sqrt(c)``; Kalman-weighted otherwise)."""

    def __init__(self, operator, y: torch.Tensor, noise_sigma: float):
        self.operator, self.y, self.noise_sigma = operator, y, float(noise_sigma)
        self.nu = matched_noise_level(operator, noise_sigma)
        self.path = None

    def constrained(self, sigma: float) -> bool:
        return self.nu is None or sigma >= self.nu

    def project(self, x, sigma: float, lam: float, generator) -> torch.Tensor:
        if not self.constrained(sigma):
            return x
        y_s, self.path = measurement_path(self.operator, self.y, sigma, self.path, self.noise_sigma, generator)
        return soft_project(self.operator, x, y_s, sigma, self.noise_sigma, lam)

    def free_part(self, vec, sigma: float) -> torch.Tensor:
        return null_space(self.operator, vec) if self.constrained(sigma) else vec

    def single_level(self) -> float | None:
        return self.nu


def measurement_consistency(operator, y: torch.Tensor, noise_sigma: float):
    """The SVD-based matching where the operator has a cheap SVD, the path-based one otherwise."""
    svd = operator.svd()
    if svd is not None:
        return SpectralConsistency(svd, y, noise_sigma)
    return PathConsistency(operator, y, noise_sigma)


__all__ = ["channel_masks", "data_loss", "pde_loss", "matched_noise_level", "measurement_path",
           "soft_project", "null_space", "SpectralConsistency", "PathConsistency", "measurement_consistency"]
