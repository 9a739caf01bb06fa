"""Physics completion: u re-solved from each sample's a, by default only when u is unobserved."""
import numpy as np
import pytest
import torch

from guidance.solve import complete_with_physics, observes_channel
from operators import DarcyResidual, solve_darcy
from operators.spec import build_operator

N = 16


def points(channel):
    return build_operator({"kind": "sparse_points", "points": [[channel, 3, 4], [channel, 8, 9]]}, (2, N, N))


def samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.where(torch.randn((3, N, N), generator=g, dtype=torch.float64) > 0, 12.0, 3.0)
    return torch.stack([a + 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64),
                        torch.randn(a.shape, generator=g, dtype=torch.float64)], 1), a


def test_observes_channel():
    assert observes_channel(points(0), 0) and not observes_channel(points(0), 1)
    assert observes_channel(points(1), 1) and not observes_channel(points(1), 0)
    blur = build_operator({"kind": "blur", "gaussian": {"sigma": 1.0, "size": 5}}, (2, N, N))
    assert observes_channel(blur, 0) and observes_channel(blur, 1)


def test_auto_completes_the_forward_problem_only():
    pde = DarcyResidual((2, N, N))
    x, a = samples()
    out, done = complete_with_physics(x, points(0), pde, "auto", levels=[3.0, 12.0])
    assert done
    assert torch.equal(out[:, 0], a)
    for k in range(3):
        np.testing.assert_allclose(out[k, 1].numpy(), solve_darcy(a[k].numpy()), rtol=1e-12)
    assert float(pde.relative_residual(out).max()) < 1e-9 < float(pde.relative_residual(x).min())
    same, done = complete_with_physics(x, points(1), pde, "auto", levels=[3.0, 12.0])
    assert not done and same is x  # u observed: kept as sampled
    forced, done = complete_with_physics(x, points(1), pde, "solve")
    assert done and torch.equal(forced[:, 0], x[:, 0])  # no levels: a unchanged
    assert complete_with_physics(x, points(0), pde, "off") == (x, False)
    assert complete_with_physics(x, points(0), None, "solve") == (x, False)
    with pytest.raises(ValueError, match="completion"):
        complete_with_physics(x, points(0), pde, "always")
