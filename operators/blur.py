"""Blur (API.md, "Operator kinds"): true convolution with one centred odd kernel per image,
given as an array, a Gaussian or a random motion kernel; circular or reflecting boundary."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator

from deepinv.physics.generator import MotionBlurGenerator

from .base import SVD, LinearOperator
from .params import (Array, Integer, Invalid, Number, OperatorSpec, Seed, SpecModel, array, fail, shape_str)
from .imaging import as_f64, present, rho_like

#: Singular values below this count as zero in the Fourier pseudo-inverses.
SVD_CUTOFF = 1e-6


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


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
    grid_observation = True

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
            k = as_f64(kernel)
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
        r = rho_like(rho, z)
        num = h.conj() * torch.fft.rfft2(y) + r * torch.fft.rfft2(z)
        return torch.fft.irfft2(num / (h.abs() ** 2 + r), s=z.shape[-2:])
