"""Imaging forward operators (API.md, "Operator kinds"): identity, inpainting, sparse points and
super-resolution, and the helpers every imaging kind shares; blur is in ``operators.blur``,
compressed sensing and MRI in ``operators.sensing``.

Every operator maps ``x: [B, C, H, W]`` to ``[B, *obs_shape]`` in the dtype and on the device
of ``x``; buffers (masks, kernels, matrices) are kept in float64 on the CPU and cast on use.
Each kind is one class: its spec model (``<Kind>Spec``, defined just above it), the
checks against the image shape (``check_spec``), the observation shape in words, and the
operator itself (``operators.base.Operator``). Constructors assume already-validated arguments
(``Kind.from_spec`` / ``operators.spec.build_operator`` validate).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from .base import SVD, LinearOperator, grid_size
from .params import (Array, Integer, OperatorSpec, array, binary, fail, shape_str)


def present(*names: str) -> list[dict]:
    """JSON-schema alternatives "this parameter is given (and not null)", one per name."""
    return [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]

def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def as_f64(a) -> torch.Tensor:
    """Array-like -> float64 CPU tensor (copied, so the caller's array cannot change us)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).clone()
    return torch.as_tensor(np.array(a, dtype=np.float64))


def rho_like(rho, like: torch.Tensor) -> torch.Tensor:
    """``rho`` (float or per-sample ``[B]``) broadcastable against ``like``."""
    r = torch.as_tensor(rho, dtype=like.dtype, device=like.device)
    return r.view((-1,) + (1,) * (like.dim() - 1)) if r.dim() == 1 else r


# ----------------------------------------------------------------------------- identity
class IdentitySpec(OperatorSpec):
    """Denoising: y = x. Observation [C,H,W]."""

    kind: Literal["identity"]


class Identity(LinearOperator):
    """Denoising: ``A = I``."""

    kind = "identity"
    Spec = IdentitySpec
    observation_shape = "[C,H,W]"
    grid_observation = True
    row_gram = 1.0

    @property
    def obs_shape(self):
        return self.in_shape

    def forward(self, x):
        return x.clone()

    def adjoint(self, y):
        return y.clone()

    def pseudo_inverse(self, y):
        return y.clone()

    def project(self, x, y):
        return y.clone()

    def prox(self, z, y, rho):
        r = rho_like(rho, z)
        return (y + r * z) / (1 + r)


# ----------------------------------------------------------------------------- inpainting
class InpaintingSpec(OperatorSpec):
    """Inpainting: y = mask * x; unobserved entries of y are ignored. Observation [C,H,W]."""

    kind: Literal["inpainting"]
    mask: Array = Field(description="Array [H,W] (every channel alike) or [C,H,W]; 1 = observed, 0 = missing")


class Inpainting(LinearOperator):
    """Inpainting: ``y = M * x`` with a binary mask ``M`` (1 = observed), shape ``[C, H, W]``.

    ``mask`` may be ``[H, W]`` (same for every channel) or ``[C, H, W]``. Unobserved entries
    of ``y`` are ignored (``A^T`` zeroes them), so ``A A^T = I`` on the observed entries.
    """

    kind = "inpainting"
    Spec = InpaintingSpec
    observation_shape = "[C,H,W]"
    grid_observation = True
    row_gram = 1.0

    @classmethod
    def check_spec(cls, spec, in_shape):
        c, h, w = in_shape
        mask = array(spec.mask, "operator.mask")
        if mask.shape not in ((h, w), (c, h, w)):
            fail("operator.mask", f"has shape {shape_str(mask)}",
                 f"shape [H,W]=[{h},{w}] or [C,H,W]=[{c},{h},{w}] matching the model")
        return {"mask": binary(mask, "operator.mask")}

    def __init__(self, in_shape, mask):
        super().__init__(in_shape)
        m = as_f64(mask)
        self.mask = m.expand(self.in_shape).clone() if m.dim() == 2 else m.reshape(self.in_shape)

    @property
    def obs_shape(self):
        return self.in_shape

    def _m(self, x):
        return self.mask.to(x)

    def forward(self, x):
        return self._m(x) * x

    def adjoint(self, y):
        return self._m(y) * y

    def pseudo_inverse(self, y):
        return self._m(y) * y

    def project(self, x, y):
        # observed entries replaced by y, the rest kept
        m = self._m(x)
        return m * y + (1 - m) * x

    def prox(self, z, y, rho):
        # entrywise (m y + rho z) / (m + rho)
        m, r = self._m(z), rho_like(rho, z)
        return (m * y + r * z) / (m + r)

    def observed(self, y):
        return self._m(y) * y

    def svd(self):
        # A = I diag(mask) I
        return SVD(vt=_same, v=_same, ut=lambda y: self._m(y) * y, s=self.mask)


# ----------------------------------------------------------------------------- sparse points
class SparsePointsSpec(OperatorSpec):
    """Point observations: y_n = x[channel_n, row_n, col_n]. Observation [N]."""

    kind: Literal["sparse_points"]
    points: Array = Field(description="Array [N,3] of integer (channel, row, col), 0-based, N >= 1; "
                                      "duplicates allowed (they add up in the adjoint)")


class SparsePoints(LinearOperator):
    """Sparse point observations: ``y_n = x[c_n, r_n, w_n]`` for ``points: [N, 3]`` (channel, row, col).

    The adjoint scatters with addition, so duplicate points add up. ``A^T A`` is diagonal
    (the number of times each entry is observed), which gives closed forms for the
    pseudo-inverse (mean over duplicates) and the prox.
    """

    kind = "sparse_points"
    Spec = SparsePointsSpec
    observation_shape = "[N]"

    @classmethod
    def check_spec(cls, spec, in_shape):
        pts = array(spec.points, "operator.points")
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 1:
            fail("operator.points", f"has shape {shape_str(pts)}",
                 "a list [[channel, row, col], ...] of shape [N,3] with N >= 1")
        if not np.issubdtype(pts.dtype, np.integer):
            if not (pts == np.round(pts)).all():
                fail("operator.points", "has non-integer entries", "integer (channel, row, col) indices")
        pts = pts.astype(np.int64)
        for axis, (name, size) in enumerate(zip(("channel", "row", "col"), in_shape)):
            bad = (pts[:, axis] < 0) | (pts[:, axis] >= size)
            if bad.any():
                i = int(np.argmax(bad))
                fail("operator.points", f"point {i} has {name} {int(pts[i, axis])} outside [0, {size - 1}]",
                     f"{name} indices in 0..{size - 1} for model shape {list(in_shape)}")
        return {"points": pts}

    def __init__(self, in_shape, points):
        super().__init__(in_shape)
        c, h, w = self.in_shape
        p = torch.as_tensor(np.asarray(points), dtype=torch.int64).reshape(-1, 3)
        self.points = p.clone()
        self.index = (p[:, 0] * h + p[:, 1]) * w + p[:, 2]  # flat index into C*H*W
        counts = torch.zeros(c * h * w, dtype=torch.float64).index_add_(
            0, self.index, torch.ones(len(self.index), dtype=torch.float64))
        self.counts = counts.view(self.in_shape)
        unique = len(torch.unique(self.index)) == len(self.index)
        self.row_gram = 1.0 if unique else None

    @property
    def obs_shape(self):
        return (len(self.index),)

    def forward(self, x):
        return x.flatten(1)[:, self.index.to(x.device)]

    def adjoint(self, y):
        out = torch.zeros((y.shape[0], math.prod(self.in_shape)), dtype=y.dtype, device=y.device)
        out = out.index_add(1, self.index.to(y.device), y)  # duplicates add
        return out.view((y.shape[0],) + self.in_shape)

    def pseudo_inverse(self, y):
        # A^+ = (A^T A)^+ A^T: observed entries get the mean of their observations
        n = self.counts.to(y)
        return self.adjoint(y) / n.clamp_min(1)

    def prox(self, z, y, rho):
        # (A^T A + rho I) is diagonal
        return (self.adjoint(y) + rho_like(rho, z) * z) / (self.counts.to(z) + rho_like(rho, z))


# ----------------------------------------------------------------------------- super-resolution
class SuperResolutionSpec(OperatorSpec):
    """Mean over each factor x factor block. Observation [C,H/f,W/f]."""

    kind: Literal["super_resolution"]
    factor: Integer(minimum=1) = Field(description="block size; must divide H and W")


class SuperResolution(LinearOperator):
    """Super-resolution: ``y`` = mean over each ``factor x factor`` block (average pooling).

    ``A A^T = I / f^2``; the adjoint is nearest-neighbour upsampling divided by ``f^2``.
    """

    kind = "super_resolution"
    Spec = SuperResolutionSpec
    observation_shape = "[C,H/f,W/f]"

    @classmethod
    def image_size(cls, spec, obs_shape):
        size = grid_size(obs_shape)
        return None if size is None else (size[0] * spec.factor, size[1] * spec.factor)

    @classmethod
    def check_spec(cls, spec, in_shape):
        f, (_, h, w) = spec.factor, in_shape
        if h % f or w % f:
            divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
            fail("operator.factor", f"{f} does not divide the image size {h}x{w}", f"one of {divisors}")
        return {"factor": f}

    def __init__(self, in_shape, factor):
        super().__init__(in_shape)
        self.factor = int(factor)
        self.row_gram = 1.0 / self.factor**2

    @property
    def obs_shape(self):
        c, h, w = self.in_shape
        return (c, h // self.factor, w // self.factor)

    def forward(self, x):
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x.clone()

    def adjoint(self, y):
        f = self.factor
        return y.repeat_interleave(f, -2).repeat_interleave(f, -1) / f**2
