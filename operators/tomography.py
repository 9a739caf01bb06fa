"""Parallel-beam computed tomography (``ct``): the Radon transform of each channel.

Geometry. The image is ``N x N`` pixels of unit size. For an angle ``theta`` (degrees) the
image is rotated by ``theta`` about its centre and integrated along its columns (at
``theta = 0`` the rays run down the columns, top to bottom, and detector positions go left to
right); the detector row is perpendicular to the rays, centred on the image centre, and spans
``G = ceil(sqrt(2) N)`` pixels (the image's diagonal, so no part of the image leaves the field
of view). With ``G`` detectors (the default) each detector is one pixel wide; ``detectors = D``
splits the same row into ``D`` equal cells, each measuring the mean over its width of the
unit-cell projections. Values are line integrals in pixel units: a constant image of 1
gives ``N`` through the centre at ``theta = 0``.

Forward: ``deepinv.physics.functional.Radon`` (rotation by bilinear ``grid_sample``, then a
sum), in float64 or the input's dtype, angles processed in chunks to bound memory. Adjoint
(back-projection): the exact transpose of that computation, by reverse-mode autodiff
(``<A x, y> = <x, A^T y>`` to rounding, tested to 1e-10 relative in float64), and the
transpose of the detector averaging. Pseudo-inverse: filtered back-projection (deepinv's
Ram-Lak filter, ``pi / (2 A)`` scaling), an approximate inverse that is accurate for smooth
images and dense angles; it is what ``project`` uses (an approximate projection that
contracts the misfit), while ``prox`` solves its system by conjugate gradients.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
from deepinv.physics.functional.radon import Radon, RampFilter
from pydantic import BeforeValidator, Field, WithJsonSchema

from .base import LinearOperator
from .params import Integer, Invalid, OperatorSpec, fail, number

#: Most angles in one spec.
MAX_ANGLES = 4096
#: Most rotated sampling positions (angles x G^2) one operator keeps (each two coordinates:
#: 2^24 positions are 256 MiB in float64), and per chunk of angles.
MAX_POSITIONS = 2**24
CHUNK_POSITIONS = 2**19


def _angles(value) -> tuple[float, ...]:
    """A count (evenly spaced in [0, 180)) or a list of angles in degrees -> the angles."""
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        values = np.asarray(value.tolist() if isinstance(value, torch.Tensor) else value, dtype=object)
        if values.ndim != 1 or not 1 <= len(values) <= MAX_ANGLES:
            raise Invalid(f"has shape {list(values.shape)}", f"a flat list of 1..{MAX_ANGLES} angles "
                          "in degrees")
        return tuple(number(v) for v in values)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise Invalid(f"expected a count or a list of angles, got {type(value).__name__}",
                      f"a count 1..{MAX_ANGLES} or a list of angles in degrees")
    v = number(value, minimum=1)
    if not v.is_integer() or v > MAX_ANGLES:
        raise Invalid(f"{v:g} is not a count of angles", f"a whole number 1..{MAX_ANGLES}")
    n = int(v)
    return tuple(180.0 * i / n for i in range(n))


#: ``angles``: a count or a list of degrees (parsed to the list of angles).
Angles = Annotated[tuple, BeforeValidator(_angles), WithJsonSchema({"anyOf": [
    {"type": "integer", "minimum": 1, "maximum": MAX_ANGLES,
     "description": "that many angles evenly spaced in [0, 180) degrees: 180 * i / n"},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": MAX_ANGLES,
     "description": "the angles in degrees"}]})]


class CTSpec(OperatorSpec):
    """Parallel-beam CT: the Radon transform of each channel (line integrals in pixel units) at the
    given angles, on a detector row spanning the image diagonal ceil(sqrt(2) N); square images
    only. Observation [C,angles,detectors] (a sinogram per channel)."""

    kind: Literal["ct"]
    angles: Angles = Field(description="a count n (angles 180 i / n degrees, i < n) or the list of angles "
                                       "in degrees; at 0 the rays run down the image columns")
    detectors: Integer(minimum=1) | None = Field(
        None, description="detector cells on the row of ceil(sqrt(2) N) pixels, each the mean over its "
                          "width; default ceil(sqrt(2) N) (unit cells); at most 4 ceil(sqrt(2) N)")


def native_detectors(n: int) -> int:
    """``G = ceil(sqrt(2) N)``: deepinv's detector count for an ``N x N`` image (unit spacing)."""
    return int(math.ceil(math.sqrt(2) * n))


def detector_averaging(native: int, detectors: int) -> torch.Tensor:
    """``[D, G]``: cell ``d`` of ``D`` equal cells on ``[0, G)`` averages the unit cells it overlaps
    (weights = overlap / cell width; every row sums to 1). The identity when ``D == G``."""
    edges = np.linspace(0.0, native, detectors + 1)
    r = np.zeros((detectors, native))
    for d in range(detectors):
        a, b = edges[d], edges[d + 1]
        for j in range(int(math.floor(a)), min(int(math.ceil(b)), native)):
            r[d, j] = max(0.0, min(b, j + 1) - max(a, j))
    return torch.as_tensor(r / (native / detectors))


class CT(LinearOperator):
    """Parallel-beam CT ``y[c, a, d]`` = the line integral of channel ``c`` at angle ``a`` over
    detector cell ``d`` (module docstring). Channels are projected independently."""

    kind = "ct"
    Spec = CTSpec
    observation_shape = "[C,angles,detectors]"

    @classmethod
    def image_size(cls, spec, obs_shape):
        """``N x N`` from the detector count when it is the native one, ``ceil(sqrt(2) N)``
        (increasing in ``N``, so one ``N`` gives it); a set ``detectors`` does not say."""
        if spec.detectors is not None or len(obs_shape) not in (3, 4):  # [C, A, G] or a stack [D, C, A, G]
            return None
        g = int(obs_shape[-1])
        n = math.floor(g / math.sqrt(2))
        n = next((m for m in (n - 1, n, n + 1) if m >= 2 and native_detectors(m) == g), None)
        return None if n is None else (n, n)

    @classmethod
    def check_spec(cls, spec, in_shape):
        c, h, w = in_shape
        if h != w or h < 2:
            fail("operator", f"ct needs a square image of at least 2 x 2 pixels, the model is {h} x {w}",
                 "use another operator or a square model")
        g = native_detectors(h)
        n_angles = len(spec.angles)
        if n_angles * g * g > MAX_POSITIONS:
            fail("operator.angles", f"{n_angles} angles on a {h} x {w} image are over the limit of "
                 f"{MAX_POSITIONS} sampling positions", f"at most {MAX_POSITIONS // (g * g)} angles")
        detectors = g if spec.detectors is None else spec.detectors
        if detectors > 4 * g:
            fail("operator.detectors", f"{detectors} cells on a row of {g} pixels", f"at most {4 * g}")
        return {"angles": list(spec.angles), "detectors": detectors}

    def __init__(self, in_shape, angles, detectors=None):
        super().__init__(in_shape)
        n = self.in_shape[1]
        self.angles = torch.as_tensor(np.asarray(angles, dtype=np.float64).reshape(-1))
        self.native = native_detectors(n)
        self.detectors = self.native if detectors is None else int(detectors)
        self.averaging = None if self.detectors == self.native else detector_averaging(self.native, self.detectors)
        self.chunk = max(1, CHUNK_POSITIONS // self.native**2)  # angles per deepinv Radon
        self._radons: dict = {}

    @property
    def obs_shape(self):
        return (self.in_shape[0], len(self.angles), self.detectors)

    # ------------------------------------------------------------------ the projection
    def _radon(self, like: torch.Tensor) -> list[Radon]:
        """deepinv's Radon transforms, one per chunk of angles, in ``like``'s dtype and device."""
        key = (like.dtype, like.device)
        if key not in self._radons:  # built on first use: constructing the operator costs nothing
            theta = self.angles.to(like.device, like.dtype)
            self._radons[key] = [
                Radon(self.in_shape[1], theta[i:i + self.chunk], circle=False, parallel_computation=True,
                      dtype=like.dtype, device=like.device) for i in range(0, len(theta), self.chunk)]
        return self._radons[key]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, N, N] -> [B, C, A, G]``: unit-cell projections."""
        return torch.cat([r(x) for r in self._radon(x)], dim=-1).transpose(-2, -1)

    def _back_project(self, q: torch.Tensor) -> torch.Tensor:
        """The exact adjoint of ``_project`` (reverse-mode autodiff of a linear map, at 0)."""
        with torch.enable_grad():
            x = torch.zeros((q.shape[0],) + self.in_shape, dtype=q.dtype, device=q.device, requires_grad=True)
            g, = torch.autograd.grad(self._project(x), x, grad_outputs=q, create_graph=q.requires_grad)
        return g

    def forward(self, x):
        p = self._project(x)
        return p if self.averaging is None else p @ self.averaging.to(p).T

    def adjoint(self, y):
        return self._back_project(y if self.averaging is None else y @ self.averaging.to(y))

    def fbp(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection: each cell's value spread over the unit cells it covers, the
        Ram-Lak ramp filter along the detector, back-projection, ``pi / (2 A)``."""
        q = y if self.averaging is None else (y @ self.averaging.to(y)) * (self.native / self.detectors)
        filtered = RampFilter(dtype=y.dtype)(q, dim=-1)
        return self._back_project(filtered) * (math.pi / (2 * len(self.angles)))

    def pseudo_inverse(self, y):
        """Filtered back-projection (``fbp``): an approximate ``A^+`` (exact in the limit of dense
        angles and detectors); the base class's ``LinearOperator.pseudo_inverse`` is the exact
        minimum-norm solution by conjugate gradients, at hundreds of projections."""
        return self.fbp(y)
