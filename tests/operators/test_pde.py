"""PDE residuals and solvers: round-off residual of ground truth, stencils, autograd, batching."""
import numpy as np
import pytest
import torch

from operators import (PDE_RESIDUALS, DarcyResidual, HelmholtzResidual, PoissonResidual,
                       solve_darcy, solve_helmholtz, solve_poisson)

N = 64


def grf(n, rng, alpha=2.0, tau=3.0):
    """DESIGN.md's Gaussian random field: Re(IFFT2(xi (4 pi^2 |k|^2 + tau^2)^(-alpha/2))), k=0 mode zero."""
    k = np.fft.fftfreq(n, 1.0 / n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    coef = (4 * np.pi**2 * k2 + tau**2) ** (-alpha / 2)
    coef[0, 0] = 0.0
    xi = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return np.real(np.fft.ifft2(xi * coef))


def darcy_coefficient(n, rng):
    return np.where(grf(n, rng) >= 0, 12.0, 3.0)


def source(n, rng):
    g = grf(n, rng)
    return g / g.std()


def ground_truth(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "darcy":
        a = darcy_coefficient(n, rng)
        return a, solve_darcy(a)
    a = source(n, rng)
    return a, (solve_poisson(a) if kind == "poisson" else solve_helmholtz(a, k=1.0))


def as_x(a, u):
    return torch.as_tensor(np.stack([a, u]))[None]


@pytest.mark.parametrize("kind", ["darcy", "poisson", "helmholtz"])
def test_ground_truth_residual_is_round_off_and_perturbation_is_not(kind):
    a, u = ground_truth(kind, N, 0)
    assert u.shape == (N, N) and np.all(u[[0, -1]] == 0) and np.all(u[:, [0, -1]] == 0)
    assert np.abs(u).max() > 0
    if kind == "darcy":
        assert 0.3 < (a == 12).mean() < 0.7 and 1e-3 < u.max() < 1e-1  # u of order 1e-2
    op = PDE_RESIDUALS[kind]((2, N, N))
    x = as_x(a, u)
    r0 = op.relative_residual(x)
    assert r0.shape == (1,) and r0.item() < 1e-8
    noise = np.random.default_rng(1).standard_normal(u.shape)
    u_noisy = u + 0.01 * np.linalg.norm(u) / np.linalg.norm(noise) * noise  # 1 % relative
    r1 = op.relative_residual(as_x(a, u_noisy)).item()
    assert r1 >= 1e3 * r0.item() and r1 > 1e-2


def _loop_residual(kind, a, u, f=1.0, k=1.0):
    """Literal per-node stencils of DESIGN.md (slow reference)."""
    n = a.shape[0]
    h = 1.0 / (n - 1)
    r = u.copy()  # boundary: the boundary-condition residual u
    for i in range(1, n - 1):
        for j in range(1, n - 1):
            nb = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
            if kind == "darcy":
                r[i, j] = sum((a[i, j] + a[q]) / 2 * (u[i, j] - u[q]) for q in nb) - f * h**2
            else:
                lap = (sum(u[q] for q in nb) - 4 * u[i, j]) / h**2
                r[i, j] = lap + (k**2 * u[i, j] if kind == "helmholtz" else 0.0) - a[i, j]
    return r


@pytest.mark.parametrize("kind,params", [("darcy", {"f": 2.5}), ("poisson", {}), ("helmholtz", {"k": 3.0})])
def test_residual_matches_literal_stencil(kind, params):
    rng = np.random.default_rng(2)
    a, u = rng.uniform(1, 5, (7, 7)), rng.standard_normal((7, 7))
    op = PDE_RESIDUALS[kind]((2, 7, 7), **params)
    got = op.residual(as_x(a, u))[0].numpy()
    np.testing.assert_allclose(got, _loop_residual(kind, a, u, **params), rtol=1e-12, atol=1e-12)
    assert op.kind == kind and not op.linear and op.obs_shape == (7, 7)


def test_solvers_satisfy_their_stencil_with_parameters():
    rng = np.random.default_rng(3)
    a = darcy_coefficient(16, rng)
    u = solve_darcy(a, f=3.0)
    assert DarcyResidual((2, 16, 16), f=3.0).relative_residual(as_x(a, u)).item() < 1e-10
    s = source(16, rng)
    u = solve_helmholtz(s, k=4.0)
    assert HelmholtzResidual((2, 16, 16), k=4.0).relative_residual(as_x(s, u)).item() < 1e-10


def test_batched_differentiable_and_channel_order():
    xs = [as_x(*ground_truth("darcy", 32, s)) for s in range(3)]
    x = torch.cat(xs)
    x[1, 1] += 1e-3  # spoil one sample only
    op = DarcyResidual((2, 32, 32))
    r = op.residual(x)
    assert r.shape == (3, 32, 32) and torch.equal(op(x), r)
    rel = op.relative_residual(x)
    assert rel[0] < 1e-8 and rel[2] < 1e-8 and rel[1] > 1e-2
    for b in range(3):  # per sample, independent of the batch
        assert torch.allclose(op.relative_residual(x[b:b + 1]), rel[b:b + 1], rtol=1e-12, atol=0)
    # boundary entries are the boundary-condition residual u
    assert torch.equal(r[1, 0], x[1, 1, 0]) and torch.equal(r[1, :, -1], x[1, 1, :, -1])
    # channels swapped: u first
    swapped = DarcyResidual((2, 32, 32), channels=(1, 0))
    assert torch.allclose(swapped.residual(x.flip(1)), r, rtol=0, atol=0)
    # autograd through the residual, for both channels
    xg = x.clone().requires_grad_(True)
    (loss,) = torch.autograd.grad(op.residual(xg).square().sum(), xg)
    assert torch.isfinite(loss).all() and loss[:, 0].abs().sum() > 0 and loss[:, 1].abs().sum() > 0
    (g,) = torch.autograd.grad(op.relative_residual(xg).sum(), xg)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cls", [PoissonResidual, HelmholtzResidual])
def test_float32_and_boundary_term(cls):
    a, u = ground_truth(cls.kind, 32, 4)
    op = cls((2, 32, 32))
    x = as_x(a, u)
    assert op.residual(x.float()).dtype == torch.float32
    assert op.relative_residual(x.float()).item() < 1e-4
    u_bad = u.copy()
    u_bad[0, :] = 0.01 * np.abs(u).max()  # violate the boundary condition only
    assert op.relative_residual(as_x(a, u_bad)).item() > 1e-2


@pytest.mark.parametrize("kind", ["darcy", "poisson", "helmholtz"])
def test_complete_gives_the_solver_pair(kind):
    """``complete`` keeps ``a`` (snapped to levels when given) and puts its exact solution in ``u``."""
    n = 32
    a, u = ground_truth(kind, n, seed=5)
    pde = PDE_RESIDUALS[kind]((2, n, n), channels=(1, 0))  # channels in reverse order
    noisy_a = a + (0.4 if kind == "darcy" else 0.0) * np.random.default_rng(1).standard_normal(a.shape)
    x = torch.as_tensor(np.stack([np.zeros_like(u), noisy_a]))[None].repeat(2, 1, 1, 1)
    out = pde.complete(x, levels=[3.0, 12.0] if kind == "darcy" else None)
    assert torch.equal(x[:, 0], torch.zeros_like(x[:, 0]))  # input untouched
    np.testing.assert_allclose(out[0, 1].numpy(), a if kind == "darcy" else noisy_a)  # snapped back to truth
    np.testing.assert_allclose(out[1, 0].numpy(), u, rtol=1e-10, atol=1e-14)
    assert float(pde.relative_residual(out).max()) < 1e-9


def test_solvers_import_numpy_and_scipy_only():
    """The exact solvers (training data on a bare machine) need neither torch nor the service's packages;
    ``operators.pde`` serves the same functions."""
    import subprocess
    import sys
    from pathlib import Path

    from operators import pde, pde_solvers

    assert (pde.solve_darcy, pde.solve_poisson, pde.solve_helmholtz, pde.grid_spacing) == (
        pde_solvers.solve_darcy, pde_solvers.solve_poisson, pde_solvers.solve_helmholtz, pde_solvers.grid_spacing)
    code = ("import sys\n"
            "from operators.pde_solvers import solve_darcy\n"
            "import numpy as np\n"
            "assert solve_darcy(np.full((6, 6), 3.0))[2, 2] > 0\n"
            "print(sorted(m for m in ('torch', 'pydantic', 'deepinv', 'fastapi') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
