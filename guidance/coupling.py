"""Coupling the slices of a volume: a proximal step of total variation along z.

DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, CVPR 2023) reconstructs a 3-D volume with a 2-D
prior: every slice is denoised by the 2-D network, and between denoising steps an ADMM step of
``lambda ||D_z x||_1`` (total variation along the slice axis only) makes neighbouring slices
agree. Here that step is the proximal map of TV along z applied to the network's estimate
``x0_hat`` of every slice of one volume and one posterior sample (``VolumeCoupler``, which the
sampler driver wraps around the denoiser, so that every method gets it at one place):

    prox(v) = argmin_u  1/2 ||u - v||^2 + w sum_d |u[d+1] - u[d]|       (each pixel's z-column)

solved by FISTA on its dual (``tv_z_prox``; Beck and Teboulle 2009, the dual of Chambolle 2004):
``u = v - D^T p`` with ``p`` minimising ``1/2 ||v - D^T p||^2`` over ``|p| <= w``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: FISTA iterations of the dual per coupling step (each a few vector operations on the volume).
TV_Z_ITERS = 40
#: The coupling kinds a request may name.
COUPLING_KINDS = ("tv_z",)


@dataclass(frozen=True)
class Coupling:
    """``{"kind": "tv_z", "weight": w}``: the weight ``w`` of TV along z, in the model's physical
    units (an intensity step between neighbouring slices costs ``w`` times its size)."""

    kind: str = "tv_z"
    weight: float = 0.0
    iters: int = TV_Z_ITERS

    def __post_init__(self):
        if self.kind not in COUPLING_KINDS:
            raise ValueError(f"coupling.kind: {self.kind!r} is not one of {list(COUPLING_KINDS)}")
        if not self.weight >= 0:
            raise ValueError("coupling.weight must be >= 0")


def diff_z(u: torch.Tensor) -> torch.Tensor:
    """``D u``: forward differences along axis 0, ``[D, ...] -> [D - 1, ...]``."""
    return u[1:] - u[:-1]


def diff_z_adjoint(p: torch.Tensor) -> torch.Tensor:
    """``D^T p``, ``[D - 1, ...] -> [D, ...]``: ``(D^T p)[d] = p[d - 1] - p[d]`` (zero outside)."""
    z = p.new_zeros((1,) + tuple(p.shape[1:]))
    return torch.cat([z, p]) - torch.cat([p, z])


def tv_z(u: torch.Tensor) -> torch.Tensor:
    """``sum |D u|`` over everything (the total variation along axis 0)."""
    return diff_z(u).abs().sum()


def tv_z_prox(v: torch.Tensor, weight, iters: int = TV_Z_ITERS) -> torch.Tensor:
    """The proximal map of ``weight * TV_z`` at ``v`` (``[D, ...]``; ``weight`` a number or a
    tensor broadcasting against one slice, e.g. per channel ``[C, 1, 1]``).

    Dual: ``min_p 1/2 ||v - D^T p||^2`` over the box ``|p| <= weight``; its gradient
    ``-D (v - D^T p)`` is Lipschitz with constant ``||D D^T|| <= 4``, so projected gradient steps
    of 1/4, accelerated (FISTA), converge as ``O(1 / k^2)`` in the dual objective. The primal
    ``u = v - D^T p`` is exact for the optimal ``p``: weight 0 gives ``v`` itself, a volume
    constant along z (``D v = 0``) is left unchanged, and one slice has nothing to couple."""
    if v.shape[0] < 2 or iters <= 0:
        return v
    w = torch.as_tensor(weight, dtype=v.dtype, device=v.device)
    if not bool((w > 0).any()):
        return v
    p = q = torch.zeros_like(diff_z(v))
    t = 1.0
    for _ in range(int(iters)):
        p_next = torch.maximum(torch.minimum(q + 0.25 * diff_z(v - diff_z_adjoint(q)), w), -w)  # projected step
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        q = p_next + ((t - 1) / t_next) * (p_next - p)  # momentum
        p, t = p_next, t_next
    return v - diff_z_adjoint(p)


class VolumeCoupler:
    """Applies ``tv_z_prox`` to the rows of a batch that form volumes.

    ``volumes``: for each volume, ``(rows, weight)``: ``rows`` a ``[K, D]`` index tensor (row
    ``rows[k, d]`` of the batch holds slice ``d`` of posterior sample ``k``) and ``weight`` its
    weight in the state's units (a number, or per channel ``[C, 1, 1]``). Rows of no volume
    pass unchanged. Under autograd the correction is applied straight through
    (``x0 + (prox(x0) - x0)`` with the bracket detached): guidance gradients see the
    denoiser's Jacobian, the state sees the coupled estimate.
    """

    def __init__(self, volumes: list[tuple[torch.Tensor, object]], iters: int = TV_Z_ITERS):
        self.volumes, self.iters = volumes, int(iters)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        v = x0.detach()
        out = v.clone()
        for rows, weight in self.volumes:
            for k in range(rows.shape[0]):  # one sample of the volume: its slices in z order
                idx = rows[k].to(v.device)
                out[idx] = tv_z_prox(v[idx], weight, self.iters)
        return x0 + (out - v) if x0.requires_grad else out


class CoupledDenoiser(torch.nn.Module):
    """A denoiser whose output is coupled across the slices of each volume (``VolumeCoupler``);
    every other attribute is its inner denoiser's."""

    def __init__(self, inner, coupler: VolumeCoupler):
        super().__init__()
        self.inner, self.coupler = inner, coupler
        self.shape, self.sigma_min, self.sigma_max = inner.shape, inner.sigma_min, inner.sigma_max
        self.sigma_data = getattr(inner, "sigma_data", 0.5)

    def forward(self, x, sigma):
        return self.coupler(self.inner(x, sigma))
