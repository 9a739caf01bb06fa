"""``kalman_cg`` against the closed-form Gaussian update ``C A^T (A C A^T + s^2 I)^-1 (y - A u)``."""
import torch

from guidance.samplers import kalman_cg
from operators.base import batch_dot


def problem(seed=0, b=2, n=12, m=5, s=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((m, n), generator=g, dtype=torch.float64)
    l = torch.randn((n, n), generator=g, dtype=torch.float64)
    c = l @ l.T / n + 0.1 * torch.eye(n, dtype=torch.float64)  # an SPD covariance
    y = torch.randn((b, m), generator=g, dtype=torch.float64)
    u = torch.randn((b, 1, 3, 4), generator=g, dtype=torch.float64)

    def residuals(v):
        return (y - v.flatten(1) @ a.T) / s

    def cov(v):
        return (v.flatten(1) @ c).reshape(v.shape)

    exact = (c @ a.T @ torch.linalg.solve(a @ c @ a.T + s**2 * torch.eye(m, dtype=torch.float64),
                                          (y - u.flatten(1) @ a.T).T)).T.reshape(u.shape)
    return residuals, cov, u, exact


def test_converges_to_the_exact_gaussian_update():
    residuals, cov, u, exact = problem()
    for affine in (True, False):
        delta = kalman_cg(residuals, u, cov, iters=12, affine=affine)
        torch.testing.assert_close(delta, exact, rtol=1e-8, atol=1e-10)


def test_error_decreases_and_one_iteration_is_the_line_search():
    residuals, cov, u, exact = problem(seed=1)
    errs = [float((kalman_cg(residuals, u, cov, k, True) - exact).norm()) for k in (1, 2, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]
    f = residuals(u)
    v = u.clone().requires_grad_(True)
    d, = torch.autograd.grad(-0.5 * residuals(v).square().sum(), v)
    g = cov(d)
    fg = residuals(u + g) - f
    kappa = -batch_dot(f, fg) / (batch_dot(fg, fg) + batch_dot(d, g))
    torch.testing.assert_close(kalman_cg(residuals, u, cov, 1, True), kappa[:, None, None, None] * g)
