"""Forward operators: imaging kinds, PDE residuals, and building them from specs.

Registries: ``OPERATORS`` (``operator.kind`` -> class; a kind is one class, see
``operators.base.Operator``) and ``PDE_RESIDUALS`` (``pde.kind`` -> class).

The names below are imported on first use (PEP 562), so that importing one submodule (say
``operators.pde``, numpy/scipy/torch only) does not import the others (pydantic, deepinv).
"""
from importlib import import_module

_WHERE = {
    "base": ("Operator", "LinearOperator", "Rescaled", "batch_dot", "conjugate_gradient"),
    "batched": ("BatchedOperator", "Unbatchable"),
    "imaging": ("Identity", "Inpainting", "SparsePoints", "SuperResolution"),
    "blur": ("Blur", "gaussian_kernel", "motion_kernel"),
    "sensing": ("CompressedSensing", "MRI", "gaussian_matrix"),
    "tomography": ("CT",),
    "pde": ("PDEResidual", "DarcyResidual", "PoissonResidual", "HelmholtzResidual", "PDE_RESIDUALS",
            "grid_spacing", "solve_darcy", "solve_poisson", "solve_helmholtz"),
    "checks": ("OperatorSpecError", "UnknownKindError"),
    "params": ("OperatorSpec",),
    "spec": ("OPERATORS", "build_operator", "build_pde", "operator_class", "validate_operator_spec"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'operators' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
