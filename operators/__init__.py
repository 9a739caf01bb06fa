"""Forward operators: imaging kinds, PDE residuals, and building them from request specs.

Registries: ``OPERATORS`` (request ``operator.kind`` -> class; a kind is one class, see
``operators.base.Operator``) and ``PDE_RESIDUALS`` (request/card ``pde.kind`` -> class).
"""
from .base import LinearOperator, Operator, Rescaled, batch_dot, conjugate_gradient
from .batched import BatchedOperator, Unbatchable
from .imaging import (MRI, Blur, CompressedSensing, Identity, Inpainting, SparsePoints,
                      SuperResolution, gaussian_kernel, gaussian_matrix, motion_kernel)
from .pde import (PDE_RESIDUALS, DarcyResidual, HelmholtzResidual, PDEResidual, PoissonResidual,
                  grid_spacing, solve_darcy, solve_helmholtz, solve_poisson)
from .params import OperatorSpec
from .tomography import CT
from .spec import (OPERATORS, OperatorSpecError, UnknownKindError, build_operator, build_pde, operator_class,
                   operator_schemas, validate_operator_spec)

__all__ = [
    "Operator", "LinearOperator", "Rescaled", "batch_dot", "conjugate_gradient",
    "BatchedOperator", "Unbatchable",
    "Identity", "Inpainting", "SparsePoints", "Blur", "SuperResolution", "CompressedSensing", "MRI", "CT",
    "gaussian_kernel", "motion_kernel", "gaussian_matrix",
    "PDEResidual", "DarcyResidual", "PoissonResidual", "HelmholtzResidual", "PDE_RESIDUALS",
    "grid_spacing", "solve_darcy", "solve_poisson", "solve_helmholtz",
    "OPERATORS", "OperatorSpec", "OperatorSpecError", "UnknownKindError", "build_operator", "build_pde",
    "operator_class", "operator_schemas", "validate_operator_spec",
]
