"""Imaging forward operators (API.md, "Operator kinds"): identity, inpainting, sparse points,
blur, super-resolution, compressed sensing and single-coil MRI.

Every operator maps ``x: [B, C, H, W]`` to ``[B, *obs_shape]`` in the dtype and on the device
of ``x``; buffers (masks, kernels, matrices) are kept in float64 on the CPU and cast on use.
Each kind is one class: its spec model (``<Kind>Spec``, defined just above it), the
checks against the image shape (``check_spec``), the observation shape in words, and the
operator itself (``operators.base.Operator``). Constructors assume already-validated arguments
(``Kind.from_spec`` / ``operators.spec.build_operator`` validate).
"""
from __future__ import annotations

import collections
import math
import threading
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from deepinv.physics.generator import MotionBlurGenerator
from pydantic import ConfigDict, Field, model_validator

from .base import SVD, LinearOperator
from .params import (Array, Integer, Invalid, Number, OperatorSpec, Seed, SpecModel, array, binary, checked,
                     fail, integer, shape_str)

#: Largest compressed-sensing matrix (entries) the server holds: 2^25 (256 MiB in float64).
MAX_CS_ENTRIES = 2**25


def present(*names: str) -> list[dict]:
    """JSON-schema alternatives "this parameter is given (and not null)", one per name."""
    return [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]

#: Singular values below this count as zero in the Fourier pseudo-inverses.
SVD_CUTOFF = 1e-6


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _f64(a) -> torch.Tensor:
    """Array-like -> float64 CPU tensor (copied, so the caller's array cannot change us)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).clone()
    return torch.as_tensor(np.array(a, dtype=np.float64))


def _rho(rho, like: torch.Tensor) -> torch.Tensor:
    """``rho`` (float or per-sample ``[B]``) broadcastable against ``like``."""
    r = torch.as_tensor(rho, dtype=like.dtype, device=like.device)
    return r.view((-1,) + (1,) * (like.dim() - 1)) if r.dim() == 1 else r


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


# ----------------------------------------------------------------------------- identity
class IdentitySpec(OperatorSpec):
    """Denoising: y = x. Observation [C,H,W]."""

    kind: Literal["identity"]


class Identity(LinearOperator):
    """Denoising: ``A = I``."""

    kind = "identity"
    Spec = IdentitySpec
    observation_shape = "[C,H,W]"
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
        r = _rho(rho, z)
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
        m = _f64(mask)
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
        m, r = self._m(z), _rho(rho, z)
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
        return (self.adjoint(y) + _rho(rho, z) * z) / (self.counts.to(z) + _rho(rho, z))


# ----------------------------------------------------------------------------- blur
def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """Isotropic Gaussian ``exp(-(i^2 + j^2) / (2 sigma^2))`` on a ``size x size`` grid, sum 1."""
    r = np.arange(size, dtype=np.float64) - size // 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    if 2.0 * sigma**2 == 0.0:  # sigma**2 underflows (sigma < ~1e-162): the limit, a unit impulse
        return (d2 == 0).astype(np.float64)  # (0 / 0 would make every entry NaN)
    g = np.exp(-d2 / (2.0 * sigma**2))
    return g / g.sum()


def motion_kernel(size: int, seed: int) -> np.ndarray:
    """Random motion-blur kernel (deepinv's Matern-GP trajectory, Schuler et al. 2015), sum 1.

    Deterministic in ``seed``: drawn with a ``torch.Generator`` seeded by it.
    """
    gen = MotionBlurGenerator((size, size), rng=torch.Generator("cpu"), dtype=torch.float64)
    k = gen.step(seed=int(seed))["filter"][0, 0].numpy()
    return k / k.sum()


def default_gaussian_size(sigma: float) -> int:
    """``2 ceil(3 sigma) + 1``: covers +-3 sigma."""
    return 2 * math.ceil(3 * sigma) + 1


def convolve(x: torch.Tensor, k: torch.Tensor, boundary: str) -> torch.Tensor:
    """True convolution of every channel with the centred odd kernel ``k``, same-size output:
    pad by ``r = k // 2`` (``"circular"`` or ``"reflect"``), then a valid convolution."""
    b, c, h, w = x.shape
    r = k.shape[-1] // 2
    xp = F.pad(x.reshape(b * c, 1, h, w), (r, r, r, r), mode=boundary)
    return F.conv2d(xp, k.flip(-2, -1)[None, None]).view(b, c, h, w)  # flip: conv, not correlation


def _pad_adjoint(z: torch.Tensor, r: int, boundary: str, dim: int) -> torch.Tensor:
    """Adjoint of padding ``dim`` by ``r`` on both sides: fold the borders back onto their sources."""
    n = z.shape[dim] - 2 * r
    out = z.narrow(dim, r, n).clone()
    left, right = z.narrow(dim, 0, r), z.narrow(dim, n + r, r)
    if boundary == "circular":  # position -j came from n - j, position n + j from j
        out.narrow(dim, n - r, r).add_(left)
        out.narrow(dim, 0, r).add_(right)
    else:  # reflect: position -j came from j, position n - 1 + j from n - 1 - j
        out.narrow(dim, 1, r).add_(left.flip(dim))
        out.narrow(dim, n - 1 - r, r).add_(right.flip(dim))
    return out


def convolve_adjoint(y: torch.Tensor, k: torch.Tensor, boundary: str) -> torch.Tensor:
    """Exact adjoint of ``convolve``: transposed valid convolution, then the padding's adjoint."""
    b, c, h, w = y.shape
    r = k.shape[-1] // 2
    z = F.conv_transpose2d(y.reshape(b * c, 1, h, w), k.flip(-2, -1)[None, None])
    z = _pad_adjoint(_pad_adjoint(z, r, boundary, -2), r, boundary, -1)
    return z.view(b, c, h, w)


class GaussianKernel(SpecModel):
    """A Gaussian kernel exp(-(i^2 + j^2) / (2 sigma^2)) on a size x size grid, sum 1."""

    sigma: Number(positive=True) = Field(description="standard deviation in pixels, > 0")
    size: Integer(minimum=1) | None = Field(None, description="odd, at most min(H, W); default "
                                                                "2*ceil(3*sigma)+1")


class MotionKernel(SpecModel):
    """A random motion trajectory (deepinv MotionBlurGenerator, a Matern-GP path), sum 1."""

    size: Integer(minimum=3) = Field(description="odd, 3 .. min(H, W)")
    seed: Seed = Field(0, description="seed of the trajectory (torch.Generator)")


def _odd_size(value: int, field: str, hw: int) -> int:
    if value % 2 == 0:
        fail(field, f"must be odd (a centred kernel), got {value}", f"{value + 1} or {value - 1}")
    if value > hw:
        fail(field, f"kernel size {value} exceeds the image size {hw}", f"an odd size <= {hw}")
    return value


class BlurSpec(OperatorSpec):
    """True convolution with a centred odd kernel, each channel alike: exactly one of kernel,
    gaussian, motion. Observation [C,H,W]."""

    model_config = ConfigDict(json_schema_extra={"oneOf": present("kernel", "gaussian", "motion")})

    kind: Literal["blur"]
    kernel: Array | None = Field(None, description="Array [k,k], k odd (at most min(H, W)), nonzero sum; "
                                                   "used as given")
    gaussian: GaussianKernel | None = Field(None, description="a Gaussian kernel: {sigma, size}")
    motion: MotionKernel | None = Field(None, description="a random motion-blur kernel: {size, seed}")
    boundary: Literal["circular", "reflect"] = Field(
        "circular", description="circular (periodic) or reflect (mirror padding without repeating the edge)")

    @model_validator(mode="after")
    def _one_kernel(self):
        given = [k for k in ("kernel", "gaussian", "motion") if getattr(self, k) is not None]
        if len(given) != 1:
            raise Invalid(f"blur got {given or 'none'} of kernel/gaussian/motion",
                          'exactly one: "kernel": [[...]], "gaussian": {"sigma": s, "size": k} '
                          'or "motion": {"size": k, "seed": n}')
        return self


class Blur(LinearOperator):
    """Blur: true convolution ``y = k * x`` of each channel with one centred odd kernel.

    The kernel is ``kernel`` ([k, k]), or ``gaussian={"sigma", "size"}``, or
    ``motion={"size", "seed"}``. ``boundary``: ``"circular"`` (periodic) or ``"reflect"``
    (mirror padding without repeating the edge, then a valid convolution). Forward and
    adjoint are ``convolve`` / ``convolve_adjoint`` (same results as deepinv's
    ``conv2d`` / ``conv_transpose2d``, checked in the tests, without their grouped
    convolution, which is several times slower on CPU). Circular blur is
    diagonal in Fourier, which gives exact pseudo-inverse and prox; reflect blur with a
    mirror-symmetric kernel (e.g. Gaussian) has a Fourier inverse on the even extension;
    other reflect blurs use the CG fallbacks.
    """

    kind = "blur"
    Spec = BlurSpec
    observation_shape = "[C,H,W]"

    @classmethod
    def check_spec(cls, spec, in_shape):
        hw = min(in_shape[1:])
        out: dict = {"boundary": spec.boundary}
        if spec.kernel is not None:
            k = array(spec.kernel, "operator.kernel").astype(np.float64)
            if k.ndim != 2 or k.shape[0] != k.shape[1]:
                fail("operator.kernel", f"has shape {shape_str(k)}", "a square [k,k] kernel with odd k")
            _odd_size(k.shape[0], "operator.kernel size", hw)
            if abs(k.sum()) < 1e-12:
                fail("operator.kernel", "sums to 0 (the blur would erase the image mean)",
                     "a kernel with a nonzero sum, usually normalized to sum 1")
            out["kernel"] = k
        elif spec.gaussian is not None:
            sigma, size = spec.gaussian.sigma, spec.gaussian.size
            size = _odd_size(default_gaussian_size(sigma) if size is None else size, "operator.gaussian.size", hw)
            out["gaussian"] = {"sigma": sigma, "size": size}
        else:
            out["motion"] = {"size": _odd_size(spec.motion.size, "operator.motion.size", hw),
                             "seed": spec.motion.seed}
        return out

    def __init__(self, in_shape, kernel=None, gaussian=None, motion=None, boundary="circular"):
        super().__init__(in_shape)
        if kernel is not None:
            k = _f64(kernel)
        elif gaussian is not None:
            sigma = float(gaussian["sigma"])
            size = int(gaussian.get("size") or default_gaussian_size(sigma))
            k = torch.as_tensor(gaussian_kernel(sigma, size))
        elif motion is not None:
            k = torch.as_tensor(motion_kernel(int(motion["size"]), int(motion.get("seed", 0))))
        else:
            raise ValueError("Blur needs one of kernel, gaussian or motion")
        self.kernel = k
        self.boundary = boundary
        h, w = self.in_shape[1:]
        self.transfer = None  # Fourier transfer function where A is diagonalized by it
        if boundary == "circular":
            self.transfer = self._transfer(k, (h, w))
        elif min(h, w) >= 2 and torch.equal(k, k.flip(0)) and torch.equal(k, k.flip(1)):
            # Mirror-symmetric kernel + reflect padding: A = S C E with E the even periodic
            # extension to 2(H-1) x 2(W-1), C circular convolution there, S the restriction.
            # C keeps even signals even, so A^{-1} = S C^{-1} E.
            self.transfer = self._transfer(k, (2 * (h - 1), 2 * (w - 1)))

    @staticmethod
    def _transfer(k: torch.Tensor, hw) -> torch.Tensor:
        """rfft2 of the kernel embedded in an ``H x W`` grid with its centre at (0, 0)."""
        pad = torch.zeros(hw, dtype=torch.float64)
        pad[: k.shape[0], : k.shape[1]] = k
        pad = torch.roll(pad, shifts=(-(k.shape[0] // 2), -(k.shape[1] // 2)), dims=(0, 1))
        return torch.fft.rfft2(pad)

    @property
    def obs_shape(self):
        return self.in_shape

    def forward(self, x):
        return convolve(x, self.kernel.to(x), self.boundary)

    def svd(self):
        """Circular blur in the unitary Fourier basis: ``A = F* diag(H) F = U diag(|H|) V^T``
        with ``V^T = F``, ``U^T = diag(conj(H)/|H|) F`` (the phase moves to ``U``)."""
        if self.boundary != "circular":
            return None
        h, w = self.in_shape[1:]
        k = self.kernel
        pad = torch.zeros((h, w), dtype=torch.float64)
        pad[: k.shape[0], : k.shape[1]] = k
        H = torch.fft.fft2(torch.roll(pad, shifts=(-(k.shape[0] // 2), -(k.shape[1] // 2)), dims=(0, 1)))
        mag = H.abs()
        phase = torch.where(mag > 0, H / mag.clamp_min(1e-300), torch.ones_like(H))
        s = torch.where(mag > 1e-12, mag, torch.zeros_like(mag))
        fft = lambda t: torch.fft.fft2(t.to(torch.complex128), norm="ortho")  # noqa: E731
        return SVD(vt=fft, v=lambda c: torch.fft.ifft2(c, norm="ortho").real,
                   ut=lambda y: phase.conj().to(y.device) * fft(y), s=s)

    def adjoint(self, y):
        return convolve_adjoint(y, self.kernel.to(y), self.boundary)

    @staticmethod
    def _even_extension(y: torch.Tensor) -> torch.Tensor:
        """``[..., H, W] -> [..., 2(H-1), 2(W-1)]``, mirrored without repeating the edge."""
        y = torch.cat((y, y[..., 1:-1, :].flip(-2)), dim=-2)
        return torch.cat((y, y[..., 1:-1].flip(-1)), dim=-1)

    def pseudo_inverse(self, y):
        """Circular: ``F^H diag(1/H) F`` (|H| < 1e-6 treated as 0), the exact pseudo-inverse.
        Reflect with a mirror-symmetric kernel: ``S C^{-1} E`` (equal to ``A^{-1}`` when no
        |H| is below the cutoff). Otherwise CG on ``A A^T``."""
        if self.transfer is None:
            return super().pseudo_inverse(y)
        h = self.transfer.to(y.device, _complex_dtype(y.dtype))
        keep = h.abs() >= SVD_CUTOFF  # zero singular values stay zero
        hinv = torch.where(keep, 1 / torch.where(keep, h, torch.ones_like(h)), torch.zeros_like(h))
        if self.boundary == "circular":
            return torch.fft.irfft2(hinv * torch.fft.rfft2(y), s=y.shape[-2:])
        big = self._even_extension(y)
        x = torch.fft.irfft2(hinv * torch.fft.rfft2(big), s=big.shape[-2:])
        return x[..., : y.shape[-2], : y.shape[-1]].contiguous()

    def prox(self, z, y, rho):
        """Circular: ``(|H|^2 + rho)^{-1} (conj(H) Y + rho Z)`` per frequency; otherwise CG."""
        if self.boundary != "circular":
            return super().prox(z, y, rho)
        h = self.transfer.to(z.device, _complex_dtype(z.dtype))
        r = _rho(rho, z)
        num = h.conj() * torch.fft.rfft2(y) + r * torch.fft.rfft2(z)
        return torch.fft.irfft2(num / (h.abs() ** 2 + r), s=z.shape[-2:])


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
        self._matrix = _f64(matrix).reshape(-1, n) if matrix is not None else None
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
        m = _f64(mask).reshape(self.in_shape[1:])
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
        r = _rho(rho, z)
        s = self.sym_mask.to(z)
        return self._fourier_solve(self.adjoint(y) + r * z, s + r[:, 0] if r.dim() == 4 else s + r)

