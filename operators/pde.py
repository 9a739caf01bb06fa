"""PDE residual operators on the DESIGN.md grid, and the exact solvers they check.

Grid: ``N x N`` nodes on ``[0, 1]^2`` including the boundary, ``h = 1 / (N - 1)``; the
field ``x: [B, C, N, N]`` holds the coefficient/source ``a`` and the solution ``u`` in the
channels named by ``channels=(a_index, u_index)``. Boundary condition: ``u = 0`` on
boundary nodes.

``residual(x) -> [B, N, N]``: at interior nodes the discrete PDE residual (below), at
boundary nodes the boundary-condition residual ``u`` itself.

- Darcy (``-div(a grad u) = f``, 5-point finite volumes, arithmetic face averages):
  ``r_P = sum_Q (a_P + a_Q)/2 (u_P - u_Q) - f h^2``.
- Poisson (``laplace(u) = a``): ``r_P = (sum_Q u_Q - 4 u_P) / h^2 - a_P``.
- Helmholtz (``laplace(u) + k^2 u = a``): ``r_P = (sum_Q u_Q - 4 u_P) / h^2 + k^2 u_P - a_P``.

``relative_residual(x) -> [B]``:
``sqrt(||r_interior||^2 + ||scale * u_boundary||^2) / ||rhs_interior||`` where the
right-hand side is ``f h^2`` (Darcy) or ``a`` (Poisson, Helmholtz) at interior nodes, and
``scale`` puts a boundary value in the units of an interior residual: the diagonal of the
stencil, ``4 mean(a)`` (Darcy) or ``4 / h^2`` (Poisson, Helmholtz).

The solvers (:mod:`operators.pde_solvers`, re-exported here) assemble exactly these stencils
(float64, ``scipy.sparse.linalg.spsolve``), so the residual of their output is at round-off level.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import Operator
from .pde_solvers import NEIGHBOURS, grid_spacing, interior, solve_darcy, solve_helmholtz, solve_poisson

__all__ = ["PDEResidual", "DarcyResidual", "PoissonResidual", "HelmholtzResidual", "PDE_RESIDUALS",
           "grid_spacing", "solve_darcy", "solve_poisson", "solve_helmholtz"]


# ----------------------------------------------------------------------------- residual operators
class PDEResidual(Operator):
    """Common part of the PDE residual operators; ``forward`` is ``residual``."""

    kind: ClassVar[str] = ""

    def __init__(self, in_shape, channels=(0, 1)):
        super().__init__(in_shape)
        c, n, m = self.in_shape
        if n != m or n < 3:
            raise ValueError(f"PDE grid must be N x N with N >= 3, got {n} x {m}")
        self.channels = tuple(int(i) for i in channels)
        self.n = n
        self.h = grid_spacing(n)

    @property
    def obs_shape(self):
        return (self.n, self.n)

    def split(self, x: torch.Tensor):
        """``(a, u)``, each ``[B, N, N]``."""
        return x[:, self.channels[0]], x[:, self.channels[1]]

    def interior_residual(self, a, u) -> torch.Tensor:
        """``[B, N-2, N-2]``: the discrete PDE residual at interior nodes."""
        raise NotImplementedError

    def rhs_norm(self, a) -> torch.Tensor:
        """``[B]``: norm of the right-hand side at interior nodes."""
        raise NotImplementedError

    def boundary_scale(self, a) -> torch.Tensor:
        """``[B]`` or scalar: factor taking a boundary value to interior-residual units."""
        raise NotImplementedError

    def solution_of(self, a: np.ndarray) -> np.ndarray:
        """The discrete solution ``u`` for coefficient ``a`` ``[N, N]`` (sparse direct solve)."""
        raise NotImplementedError

    def complete(self, x: torch.Tensor, levels=None) -> torch.Tensor:
        """``x`` with ``u`` replaced by the exact solution for its ``a`` (``a`` first snapped
        to the nearest of ``levels`` when given, e.g. Darcy's {3, 12}): a pair with zero residual."""
        ia, iu = self.channels
        out = x.detach().clone()
        a = out[:, ia].cpu().double().numpy()
        if levels:
            lv = np.asarray(sorted(float(v) for v in levels))
            a = lv[np.abs(a[..., None] - lv).argmin(-1)]
        out[:, ia] = torch.as_tensor(a, dtype=out.dtype, device=out.device)
        u = np.stack([self.solution_of(ai) for ai in a])
        out[:, iu] = torch.as_tensor(u, dtype=out.dtype, device=out.device)
        return out

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, N]``: PDE residual at interior nodes, ``u`` at boundary nodes."""
        a, u = self.split(x)
        r = F.pad(self.interior_residual(a, u), (1, 1, 1, 1))
        boundary = torch.ones_like(u)
        boundary[..., 1:-1, 1:-1] = 0
        return r + boundary * u

    forward = residual

    def relative_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]``: ``sqrt(||r_int||^2 + ||scale u_bd||^2) / ||rhs_int||`` (module docstring)."""
        a, u = self.split(x)
        r_int = self.interior_residual(a, u).flatten(1)
        scale = torch.as_tensor(self.boundary_scale(a), dtype=x.dtype, device=x.device)
        u_bd = u.clone()
        u_bd[..., 1:-1, 1:-1] = 0
        tiny = torch.finfo(x.dtype).tiny
        sq = r_int.square().sum(1) + scale**2 * u_bd.flatten(1).square().sum(1)
        return sq.clamp_min(tiny).sqrt() / self.rhs_norm(a).clamp_min(tiny)  # clamp: finite grad at 0


def _laplacian(u: torch.Tensor, h: float) -> torch.Tensor:
    """5-point Laplacian at interior nodes: ``(sum_Q u_Q - 4 u_P) / h^2``."""
    s = sum(interior(u, di, dj) for di, dj in NEIGHBOURS)
    return (s - 4 * interior(u)) / h**2


class DarcyResidual(PDEResidual):
    """Darcy flow ``-div(a grad u) = f`` (DESIGN.md): finite-volume residual
    ``sum_Q (a_P + a_Q)/2 (u_P - u_Q) - f h^2`` at interior nodes; ``u`` on the boundary."""

    kind = "darcy"

    def __init__(self, in_shape, f: float = 1.0, channels=(0, 1)):
        super().__init__(in_shape, channels)
        self.f = float(f)

    def interior_residual(self, a, u):
        a_p, u_p = interior(a), interior(u)
        flux = sum((a_p + interior(a, di, dj)) / 2 * (u_p - interior(u, di, dj))
                   for di, dj in NEIGHBOURS)
        return flux - self.f * self.h**2

    def rhs_norm(self, a):
        return torch.full(a.shape[:1], abs(self.f) * self.h**2 * (self.n - 2),
                          dtype=a.dtype, device=a.device)

    def boundary_scale(self, a):
        return 4 * a.flatten(1).mean(1)

    def solution_of(self, a):
        return solve_darcy(a, self.f)


class PoissonResidual(PDEResidual):
    """Poisson ``laplace(u) = a`` (DESIGN.md): ``(sum_Q u_Q - 4 u_P)/h^2 - a_P`` at interior
    nodes; ``u`` on the boundary."""

    kind = "poisson"

    def interior_residual(self, a, u):
        return _laplacian(u, self.h) - interior(a)

    def rhs_norm(self, a):
        return interior(a).flatten(1).norm(dim=1)

    def boundary_scale(self, a):
        return 4 / self.h**2

    def solution_of(self, a):
        return solve_poisson(a)


class HelmholtzResidual(PoissonResidual):
    """Helmholtz ``laplace(u) + k^2 u = a`` (DESIGN.md): ``(sum_Q u_Q - 4 u_P)/h^2 + k^2 u_P - a_P``
    at interior nodes; ``u`` on the boundary."""

    kind = "helmholtz"

    def __init__(self, in_shape, k: float = 1.0, channels=(0, 1)):
        super().__init__(in_shape, channels)
        self.k = float(k)

    def interior_residual(self, a, u):
        return _laplacian(u, self.h) + self.k**2 * interior(u) - interior(a)

    def solution_of(self, a):
        return solve_helmholtz(a, self.k)


PDE_RESIDUALS: dict[str, type[PDEResidual]] = {
    cls.kind: cls for cls in (DarcyResidual, PoissonResidual, HelmholtzResidual)
}
