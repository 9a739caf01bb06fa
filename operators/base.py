"""The one operator interface: forward, and for linear kinds adjoint, projection and prox.

Shapes: every operator maps a batch ``x`` of shape ``[B, C, H, W]`` (physical units)
to observations ``[B, *obs_shape]``. Operators are immutable: everything that
defines them (mask, kernel, points, matrix) goes to the constructor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from .checks import OperatorSpecError, check_in_shape

if TYPE_CHECKING:  # the spec models (pydantic): PDE residuals need none
    from .params import OperatorSpec


def grid_size(obs_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(H, W)`` of an observation on the image grid, ``[C, H, W]`` or ``[H, W]`` (or a stack of
    them, ``[D, C, H, W]``)."""
    return tuple(int(v) for v in obs_shape[-2:]) if len(obs_shape) in (2, 3, 4) else None


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product <a_b, b_b> over all but the batch dimension."""
    return (a * b).flatten(1).sum(1)


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                       x0: torch.Tensor | None = None, *, tol: float = 1e-6,
                       max_iter: int = 200) -> torch.Tensor:
    """Solve ``apply(x) = rhs`` for a symmetric positive (semi-)definite ``apply``, batched.

    Each sample converges on its own (per-sample step lengths); stops when every
    sample's residual is below ``tol`` relative to its right-hand side.
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - apply(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = batch_dot(r, r)
    stop = (tol * torch.sqrt(batch_dot(rhs, rhs))).clamp_min(1e-30) ** 2
    shape = (-1,) + (1,) * (rhs.dim() - 1)
    for _ in range(max_iter):
        if bool((rr <= stop).all()):
            break
        ap = apply(p)
        pap = batch_dot(p, ap)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), torch.zeros_like(rr))
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * ap
        rr_new = batch_dot(r, r)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        p = r + beta.view(shape) * p
        rr = rr_new
    return x


@dataclass(frozen=True)
class SVD:
    """``A = U diag(s) V^T`` in coordinates where the transforms are cheap (e.g. Fourier for
    circular blur). ``vt``: x -> coefficients, ``v``: coefficients -> x (``V`` orthonormal),
    ``ut``: y -> coefficients; ``s`` broadcasts against the coefficients, 0 where unobserved."""

    vt: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    ut: Callable[[torch.Tensor], torch.Tensor]
    s: torch.Tensor


class Operator:
    """A forward model ``y = A(x)``; nonlinear unless the class says otherwise.

    An operator kind is one subclass (registered in ``operators.spec.OPERATORS``); the
    class is all the service knows of it:

    - ``Spec``: the declaration of its parameters (``{"kind": ..., ...}``: typed, with ranges and
      one-line meanings, see ``operators.params``); its array fields are ``Spec.array_fields()``;
    - ``observation_shape``: the observation's shape in words (``"[C,H,W]"``, ``"[m]"``);
    - ``check_spec(spec, in_shape)``: the checks against the model's shape, returning the
      constructor's keyword arguments; ``validate_spec`` = parse + check; ``from_spec`` builds;
    - ``observed(y)``: ``y`` with the entries the operator never produces zeroed.
    """

    linear: ClassVar[bool] = False
    kind: ClassVar[str] = ""
    #: The declaration of its parameters (None: not built from a spec, e.g. a PDE residual).
    Spec: ClassVar[type[OperatorSpec] | None] = None
    #: The observation's shape, in words.
    observation_shape: ClassVar[str] = ""
    #: True when the observation lies on the image's grid (``[C, H, W]``): it tells the image size.
    grid_observation: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("Spec")
        if spec is not None and spec.kind_name() != cls.kind:
            raise TypeError(f"{cls.__name__}.Spec has kind {spec.kind_name()!r}, the class {cls.kind!r}")

    # ------------------------------------------------------------------ from a spec
    @classmethod
    def parse_spec(cls, spec) -> OperatorSpec:
        """The spec (a dict or a ``Spec``) checked for all that does not depend on the image shape."""
        if cls.Spec is None:
            raise OperatorSpecError(None, f"{cls.__name__} cannot be built from a spec")
        return cls.Spec.parse(spec)

    @classmethod
    def image_size(cls, spec: OperatorSpec, obs_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The image size ``(H, W)`` that an observation of ``obs_shape`` implies under ``spec``
        (None: the observation does not say, e.g. a list of points or of measurements)."""
        return grid_size(obs_shape) if cls.grid_observation else None

    @classmethod
    def check_spec(cls, spec: OperatorSpec, in_shape: tuple[int, int, int]) -> dict:
        """The parsed spec checked against the image shape ``(C, H, W)``: the constructor's keyword
        arguments (default: the parameters as given). Raises ``OperatorSpecError``."""
        return spec.parameters()

    @classmethod
    def validate_spec(cls, spec, in_shape) -> dict:
        """Every check of a spec for images of shape ``in_shape``: the constructor's keyword arguments."""
        shape = check_in_shape(in_shape)
        return cls.check_spec(cls.parse_spec(spec), shape)

    @classmethod
    def from_spec(cls, spec, in_shape) -> "Operator":
        """The operator a (dict or ``Spec``) spec describes, for images of shape ``in_shape``."""
        return cls(check_in_shape(in_shape), **cls.validate_spec(spec, in_shape))

    #: True when the operator treats channels independently (an observation entry
    #: depends on one channel only), so a per-channel rescaling of ``x`` commutes
    #: with its pseudo-inverse.
    channel_separable: bool = True

    def __init__(self, in_shape: tuple[int, int, int]):
        self.in_shape = tuple(int(s) for s in in_shape)

    @property
    def obs_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Dispatch dynamically: a class-level ``__call__ = forward`` would bind this
        # base ``forward`` and ignore every subclass's override.
        return self.forward(x)

    def observed(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` with the entries the operator never produces set to 0 (unobserved pixels of an
        inpainting mask, unsampled k-space): they carry no information and must not count."""
        return y


class LinearOperator(Operator):
    """A linear forward model with its adjoint; projection and prox by CG unless overridden."""

    linear: ClassVar[bool] = True

    #: ``c`` when ``A A^T = c I`` (selections, block means, unitary transforms), else None.
    #: Samplers use it for exact noise-level matching of the measurement.
    row_gram: float | None = None

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def svd(self) -> SVD | None:
        """A cheap singular value decomposition, where one exists (None otherwise)."""
        return None

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T A x``."""
        return self.adjoint(self.forward(x))

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Minimum-norm solution ``A^+ y = A^T (A A^T)^{-1} y`` (CG on the row Gram)."""
        if self.row_gram is not None:
            return self.adjoint(y) / self.row_gram
        z = conjugate_gradient(lambda v: self.forward(self.adjoint(v)), y)
        return self.adjoint(z)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Closest point to ``x`` with ``A x = y``: ``x + A^+ (y - A x)``."""
        return x + self.pseudo_inverse(y - self.forward(x))

    def prox(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """``argmin_u ||A u - y||^2 + rho ||u - z||^2 = (A^T A + rho I)^{-1}(A^T y + rho z)``.

        ``rho`` is a float or a per-sample tensor ``[B]``.
        """
        rho_b = torch.as_tensor(rho, dtype=z.dtype, device=z.device)
        if rho_b.dim() == 1:
            rho_b = rho_b.view((-1,) + (1,) * (z.dim() - 1))
        if self.row_gram is not None:
            # Woodbury with A A^T = c I: u = z + A^T (y - A z) / (c + rho)
            return z + self.adjoint(y - self.forward(z)) / (self.row_gram + rho_b)
        rhs = self.adjoint(y) + rho_b * z
        return conjugate_gradient(lambda u: self.normal(u) + rho_b * u, rhs, x0=z)


class Rescaled(Operator):
    """``A`` seen from the network's normalized space: ``x_phys = shift + scale * x`` per channel.

    For a linear ``A`` the offset moves to the observation: ``A(shift + S x) = A(shift) + A S x``,
    so samplers see the linear map ``A S`` and ``y - A(shift)`` (see ``Rescaled.observation``).
    """

    def __init__(self, op: Operator, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__(op.in_shape)
        self.op = op
        self.linear = op.linear  # type: ignore[misc]
        self.kind = op.kind  # type: ignore[misc]
        self.channel_separable = op.channel_separable
        c = op.in_shape[0]
        self.shift = torch.as_tensor(shift, dtype=torch.float64).reshape(1, c, 1, 1)
        self.scale = torch.as_tensor(scale, dtype=torch.float64).reshape(1, c, 1, 1)

    def _s(self, x):
        return self.scale.to(x)

    @property
    def obs_shape(self):
        return self.op.obs_shape

    def to_physical(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift.to(x) + self._s(x) * x

    def to_network(self, x_phys: torch.Tensor) -> torch.Tensor:
        return (x_phys - self.shift.to(x_phys)) / self._s(x_phys)

    def observation(self, y: torch.Tensor) -> torch.Tensor:
        """The observation as the linear part sees it: ``y - A(shift)`` (``y`` itself if nonlinear)."""
        if not self.op.linear:
            return y
        shift = self.shift.to(y).expand((1,) + self.in_shape)
        return y - self.op.forward(shift)

    def forward(self, x):
        if self.op.linear:
            return self.op.forward(self._s(x) * x)
        return self.op.forward(self.to_physical(x))

    __call__ = forward

    # Linear part: A S.
    def adjoint(self, y):
        return self._s(y) * self.op.adjoint(y)

    def normal(self, x):
        return self.adjoint(self.forward(x))

    @property
    def row_gram(self):
        s = self.scale.flatten()
        if self.op.row_gram is not None and bool((s == s[0]).all()):
            return self.op.row_gram * float(s[0]) ** 2
        return None

    def svd(self):
        # A S = U diag(s * scale) V^T when the scale is one number.
        inner = self.op.svd() if self.op.linear else None
        s = self.scale.flatten()
        if inner is None or not bool((s == s[0]).all()):
            return None
        return SVD(inner.vt, inner.v, inner.ut, inner.s * float(s[0]))

    def pseudo_inverse(self, y):
        # (A S)^+ = S^{-1} A^+ when A acts on each channel separately.
        if self.op.channel_separable:
            return self.op.pseudo_inverse(y) / self._s(y)
        return LinearOperator.pseudo_inverse(self, y)  # type: ignore[arg-type]

    def project(self, x, y):
        return x + self.pseudo_inverse(y - self.forward(x))

    def prox(self, z, y, rho):
        # One scale s: argmin ||A s u - y||^2 + rho ||u - z||^2 = prox_A(s z, y, rho / s^2) / s.
        sc = self.scale.flatten()
        if bool((sc == sc[0]).all()):
            s0 = float(sc[0])
            rho_t = torch.as_tensor(rho, dtype=z.dtype, device=z.device)
            return self.op.prox(s0 * z, y, rho_t / s0 ** 2) / s0
        return LinearOperator.prox(self, z, y, rho)  # type: ignore[arg-type]

    def residual(self, x):
        """PDE residual of the physical field (for PDE operators)."""
        return self.op.residual(self.to_physical(x))
