"""Compressed sensing and single-coil MRI (API.md, "Operator kinds"): a Gaussian matrix drawn
by seed (or sent), and a sampled 2-D Fourier transform."""
from __future__ import annotations

import collections
import math
import threading
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator

from .base import LinearOperator, grid_size
from .params import (Array, Integer, Invalid, OperatorSpec, Seed, array, binary, checked,
                     fail, integer, shape_str)
from .imaging import as_f64, present, rho_like

#: Largest compressed-sensing matrix (entries) the server holds: 2^25 (256 MiB in float64).
MAX_CS_ENTRIES = 2**25


# ----------------------------------------------------------------------------- compressed sensing
def gaussian_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """``[m, n]`` with i.i.d. N(0, 1/m) entries from ``torch.Generator().manual_seed(seed)``
    (float32 draws, as ``deepinv.physics.CompressedSensing``), returned in float64."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return (torch.randn((m, n), generator=g) / math.sqrt(m)).to(torch.float64)


class SeededMatrices:
    """Process-wide LRU of ``gaussian_matrix`` draws bounded by their bytes (the newest is kept
    whatever its size): operators with the same ``(m, n, seed)`` share one draw. Draws run
    one at a time under the lock, so concurrent requests for one matrix draw it once."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, m: int, n: int, seed: int) -> torch.Tensor:
        key = (int(m), int(n), int(seed))
        with self._lock:
            if key not in self._items:
                self._items[key] = gaussian_matrix(*key)
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(a.nbytes for a in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
            return self._items[key]


SEEDED_MATRICES = SeededMatrices()


class CompressedSensingSpec(OperatorSpec):
    """y = A vec(x), A [m, C*H*W]: Gaussian N(0, 1/m) drawn from seed (torch.Generator), or matrix
    given; mixes channels. Observation [m]."""

    model_config = ConfigDict(json_schema_extra={"anyOf": present("m", "matrix")})

    kind: Literal["compressed_sensing"]
    m: Integer(minimum=1) | None = Field(None, description="measurements, 1..C*H*W (with m*C*H*W <= 2^25); "
                                                           "implied by matrix")
    seed: Seed | None = Field(None, description="seed of the Gaussian matrix the server draws; default 0; "
                                                "not with matrix")
    matrix: Array | None = Field(None, description="Array [m, C*H*W], row-major (C, H, W) flattening")

    @model_validator(mode="after")
    def _seed_or_matrix(self):
        if self.matrix is not None and self.seed is not None:
            raise Invalid("got both seed and matrix", "either seed (server draws) or matrix")
        return self


class CompressedSensing(LinearOperator):
    """Compressed sensing: ``y = A vec(x)`` with a dense ``[m, C*H*W]`` matrix (mixes channels).

    The matrix is ``matrix`` if given, else Gaussian drawn from ``seed`` (``gaussian_matrix``)
    on first use, through ``SEEDED_MATRICES``: constructing the operator costs nothing, and an
    operator keeps the matrix only once it has been applied. Pseudo-inverse by a Cholesky
    factorization of ``A A^T`` (computed on first use; CG if ``A`` is rank-deficient); prox by CG.
    """

    kind = "compressed_sensing"
    Spec = CompressedSensingSpec
    observation_shape = "[m]"
    channel_separable = False

    @classmethod
    def check_spec(cls, spec, in_shape):
        n = math.prod(in_shape)
        if spec.matrix is not None:
            a = array(spec.matrix, "operator.matrix").astype(np.float64)
            if a.ndim != 2 or a.shape[1] != n or a.shape[0] < 1:
                fail("operator.matrix", f"has shape {shape_str(a)}", f"shape [m, C*H*W] = [m, {n}]")
            if spec.m is not None and spec.m != a.shape[0]:
                fail("operator.m", f"{spec.m} differs from the matrix's {a.shape[0]} rows",
                     "m equal to the number of rows, or leave it out")
            if a.size > MAX_CS_ENTRIES:
                fail("operator.matrix", f"has {a.size} entries, over the limit {MAX_CS_ENTRIES}",
                     "fewer measurements")
            return {"matrix": a}
        if spec.m is None:
            fail("operator", "compressed_sensing needs m", f'"m": 1..{n} (and optionally "seed")')
        m = checked("operator.m", integer, spec.m, minimum=1, maximum=n)
        if m * n > MAX_CS_ENTRIES:
            fail("operator.m", f"{m} x {n} matrix is over the limit of {MAX_CS_ENTRIES} entries",
                 f"m <= {MAX_CS_ENTRIES // n}")
        return {"m": m, "seed": 0 if spec.seed is None else spec.seed}

    def __init__(self, in_shape, m=None, seed=0, matrix=None):
        super().__init__(in_shape)
        n = math.prod(self.in_shape)
        self._matrix = as_f64(matrix).reshape(-1, n) if matrix is not None else None
        self.m = self._matrix.shape[0] if matrix is not None else int(m)
        self.seed = int(seed)
        self._cache: dict = {}

    @property
    def matrix(self) -> torch.Tensor:
        """``[m, C*H*W]`` float64."""
        if self._matrix is not None:
            return self._matrix
        return SEEDED_MATRICES.get(self.m, math.prod(self.in_shape), self.seed)

    @property
    def obs_shape(self):
        return (self.m,)

    def _a(self, like):
        key = (like.dtype, like.device)
        if key not in self._cache:  # cast once per dtype/device
            self._cache[key] = self.matrix.to(like)
        return self._cache[key]

    def forward(self, x):
        return x.flatten(1) @ self._a(x).T

    def adjoint(self, y):
        return (y @ self._a(y)).view((y.shape[0],) + self.in_shape)

    def _gram_factor(self):
        if "chol" not in self._cache:
            a = self.matrix
            l, info = torch.linalg.cholesky_ex(a @ a.T)
            self._cache["chol"] = l if int(info) == 0 else None
        return self._cache["chol"]

    def pseudo_inverse(self, y):
        # A^+ y = A^T (A A^T)^{-1} y
        l = self._gram_factor()
        if l is None:
            return super().pseudo_inverse(y)
        z = torch.cholesky_solve(y.to(torch.float64).T, l.to(y.device)).T
        return self.adjoint(z.to(y.dtype))


# ----------------------------------------------------------------------------- MRI
class MRISpec(OperatorSpec):
    """y = mask * FFT2(x), orthonormal FFT, numpy layout (DC at [0,0]); image C=1 real or C=2
    (real, imaginary). Observation [2,H,W] (real, imaginary)."""

    kind: Literal["mri"]
    mask: Array = Field(description="Array [H,W], 1 = sampled k-space location (DC at [0,0], numpy fft2 layout)")


class MRI(LinearOperator):
    """Single-coil MRI: ``y = M * FFT2(x)`` (orthonormal FFT, numpy's layout: DC at [0, 0]),
    returned as ``[2, H, W]`` (real, imaginary).

    ``C == 1``: a real image. Its spectrum is Hermitian, so ``A A^T != I`` in general:
    ``A^T A = F^H diag(s) F`` with the symmetrized mask ``s(k) = (M(k) + M(-k)) / 2``, which
    gives exact Fourier pseudo-inverse and prox (``row_gram`` is None).
    ``C == 2``: a complex image (real, imaginary channels); ``A A^T = I`` on sampled entries
    (``row_gram = 1``, unsampled entries of ``y`` ignored).
    """

    kind = "mri"
    Spec = MRISpec
    observation_shape = "[2,H,W]"

    @classmethod
    def image_size(cls, spec, obs_shape):
        return grid_size(obs_shape) if len(obs_shape) == 3 else None

    @classmethod
    def check_spec(cls, spec, in_shape):
        c, h, w = in_shape
        if c not in (1, 2):
            fail("operator", f"mri needs a 1-channel (real) or 2-channel (real, imaginary) image, "
                 f"the model has {c} channels", "use another operator or a 1- or 2-channel model")
        mask = array(spec.mask, "operator.mask")
        if mask.shape != (h, w):
            fail("operator.mask", f"has shape {shape_str(mask)}",
                 f"a k-space mask of shape [H,W]=[{h},{w}] (DC at [0,0], numpy fft2 layout)")
        return {"mask": binary(mask, "operator.mask")}

    def __init__(self, in_shape, mask):
        super().__init__(in_shape)
        m = as_f64(mask).reshape(self.in_shape[1:])
        self.mask = m
        self.complex_image = self.in_shape[0] == 2
        self.channel_separable = not self.complex_image  # real/imag parts mix
        self.row_gram = 1.0 if self.complex_image else None
        # M(-k): index (-i mod H, -j mod W)
        h, w = m.shape
        m_neg = m[(-torch.arange(h)) % h][:, (-torch.arange(w)) % w]
        self.sym_mask = (m + m_neg) / 2

    @property
    def obs_shape(self):
        return (2,) + self.in_shape[1:]

    def _to_complex(self, x):
        return torch.complex(x[:, 0], x[:, 1]) if self.complex_image else x[:, 0]

    def observed(self, y):
        return self.mask.to(y) * y

    def forward(self, x):
        k = self.mask.to(x) * torch.fft.fft2(self._to_complex(x), norm="ortho")
        return torch.stack((k.real, k.imag), dim=1)

    def adjoint(self, y):
        z = torch.fft.ifft2(self.mask.to(y) * torch.complex(y[:, 0], y[:, 1]), norm="ortho")
        if self.complex_image:
            return torch.stack((z.real, z.imag), dim=1)
        return z.real[:, None]  # real inner product: adjoint of x -> F x is Re F^H

    def _fourier_solve(self, v, den, keep=None):
        """Real image ``F^H diag(1/den) F v``, zero where ``keep`` is False."""
        num = torch.fft.fft2(v[:, 0])
        if keep is not None:
            den = torch.where(keep, den, torch.ones_like(den))
            num = torch.where(keep, num, torch.zeros_like(num))
        return torch.fft.ifft2(num / den).real[:, None]

    def pseudo_inverse(self, y):
        if self.complex_image:
            return super().pseudo_inverse(y)
        s = self.sym_mask.to(y)
        return self._fourier_solve(self.adjoint(y), s, keep=s > 0)

    def prox(self, z, y, rho):
        if self.complex_image:
            return super().prox(z, y, rho)
        r = rho_like(rho, z)
        s = self.sym_mask.to(z)
        return self._fourier_solve(self.adjoint(y) + r * z, s + r[:, 0] if r.dim() == 4 else s + r)
