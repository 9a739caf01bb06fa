"""Rescaled: operators seen from the network's normalized space (per-channel shift and scale)."""
import numpy as np
import pytest
import torch

from operators import DarcyResidual, Rescaled, batch_dot, build_operator

SHAPE = (2, 8, 6)
SHIFT = torch.tensor([0.5, -3.0], dtype=torch.float64)
SCALE = torch.tensor([2.0, 0.01], dtype=torch.float64)  # very different channel scales
_rng = np.random.default_rng(0)
SPECS = {
    "identity": {"kind": "identity"},
    "inpainting": {"kind": "inpainting", "mask": (_rng.random(SHAPE) < 0.5).astype(float)},
    "sparse_points": {"kind": "sparse_points",
                      "points": [[0, 1, 1], [1, 1, 1], [1, 7, 5], [0, 3, 2], [1, 7, 5], [1, 0, 4]]},
    "blur": {"kind": "blur", "gaussian": {"sigma": 1.0, "size": 3}},
    "blur-reflect": {"kind": "blur", "gaussian": {"sigma": 1.0, "size": 3}, "boundary": "reflect"},
    "super_resolution": {"kind": "super_resolution", "factor": 2},
    "compressed_sensing": {"kind": "compressed_sensing", "m": 40, "seed": 1},
    "mri": {"kind": "mri", "mask": (_rng.random(SHAPE[1:]) < 0.5).astype(float)},
}


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rescaled(name):
    op = build_operator(SPECS[name], SHAPE)
    return op, Rescaled(op, SHIFT, SCALE)


def rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("name", SPECS)
def test_forward_moves_the_shift_to_the_observation(name):
    op, r = rescaled(name)
    x = randn((3,) + SHAPE, 0)
    shift = SHIFT.view(1, 2, 1, 1).expand((1,) + SHAPE)
    want = op.forward(x) - op.forward(shift)
    assert rel(r.forward(r.to_network(x)), want) <= 1e-12
    assert rel(r.observation(op.forward(x)), want) <= 1e-12
    assert torch.allclose(r.to_physical(r.to_network(x)), x, rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("name", SPECS)
def test_adjoint_identity(name):
    _, r = rescaled(name)
    x, y = randn((3,) + SHAPE, 1), randn((3,) + tuple(r.obs_shape), 2)
    lhs, rhs = batch_dot(r.forward(x), y), batch_dot(x, r.adjoint(y))
    assert torch.all((lhs - rhs).abs() <= 1e-10 * lhs.abs())


@pytest.mark.parametrize("name", ["inpainting", "sparse_points", "blur", "super_resolution", "identity"])
def test_project_is_exactly_consistent(name):
    op, r = rescaled(name)
    x_true = randn((3,) + SHAPE, 3) * SCALE.view(1, 2, 1, 1) + SHIFT.view(1, 2, 1, 1)
    y = op.forward(x_true)  # physical observation
    xn = r.project(randn((3,) + SHAPE, 4), r.observation(y))
    assert rel(r.forward(xn), r.observation(y)) <= 1e-10
    assert rel(op.forward(r.to_physical(xn)), y) <= 1e-10


def test_project_on_selections_touches_only_observed_entries():
    op, r = rescaled("inpainting")
    x_true = randn((1,) + SHAPE, 5) * SCALE.view(1, 2, 1, 1) + SHIFT.view(1, 2, 1, 1)
    xn = randn((1,) + SHAPE, 6)
    p = r.to_physical(r.project(xn, r.observation(op.forward(x_true))))
    m = op.mask.bool().expand_as(p)
    assert torch.allclose(p[m], x_true[m], rtol=1e-12, atol=1e-12)
    assert torch.allclose(p[~m], r.to_physical(xn)[~m], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["compressed_sensing", "mri"])
def test_project_cg_route_for_channel_mixing_operators(name):
    op, r = rescaled(name)  # mri: 2 channels = (real, imaginary), mixed by the FFT
    assert not r.channel_separable
    y = op.forward(randn((2,) + SHAPE, 7))
    xn = r.project(torch.zeros((2,) + SHAPE, dtype=torch.float64), r.observation(y))
    assert rel(r.forward(xn), r.observation(y)) <= 1e-6  # CG's tolerance


def test_row_gram_and_prox():
    _, r = rescaled("inpainting")
    assert r.row_gram is None  # unequal channel scales
    op = build_operator(SPECS["inpainting"], SHAPE)
    assert Rescaled(op, SHIFT, torch.tensor([3.0, 3.0])).row_gram == 9.0
    # prox of A S against the dense closed form
    n = int(np.prod(SHAPE))
    a = r.forward(torch.eye(n, dtype=torch.float64).view((n,) + SHAPE)).reshape(n, -1).T
    z, y, rho = randn((1,) + SHAPE, 8), randn((1,) + SHAPE, 9), 0.7
    want = torch.linalg.solve(a.T @ a + rho * torch.eye(n, dtype=torch.float64),
                              a.T @ y.flatten() + rho * z.flatten()).view(z.shape)
    assert rel(r.prox(z, y, rho), want) <= 1e-5


def test_pde_residual_through_rescaled():
    op = DarcyResidual((2, 8, 8))
    r = Rescaled(op, torch.tensor([7.5, 0.0]), torch.tensor([4.5, 0.01]))
    x = torch.stack([torch.full((8, 8), 3.0), randn((8, 8), 10) * 0.01])[None].double()
    assert not r.linear and r.kind == "darcy"
    assert torch.allclose(r.residual(r.to_network(x)), op.residual(x), rtol=1e-12, atol=1e-15)
    assert torch.allclose(r(r.to_network(x)), op(x), rtol=1e-12, atol=1e-15)


def test_rescaled_prox_matches_dense_closed_form():
    """prox of A S with one scale s, by the operator's own closed form, equals the dense formula."""
    import numpy as np
    from guidance.exact import dense_matrix
    from operators.base import Rescaled
    from operators.blur import Blur
    op = Rescaled(Blur((1, 8, 8), gaussian={"sigma": 1.0, "size": 3}), [0.2], [0.5])
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, 1, 8, 8), generator=g, dtype=torch.float64)
    y = torch.randn((1, 1, 8, 8), generator=g, dtype=torch.float64)
    a = dense_matrix(op)
    rho = 0.3
    want = np.linalg.solve(a.T @ a + rho * np.eye(64), a.T @ y.reshape(-1).numpy() + rho * z.reshape(-1).numpy())
    np.testing.assert_allclose(op.prox(z, y, rho).reshape(-1).numpy(), want, rtol=1e-8, atol=1e-10)
