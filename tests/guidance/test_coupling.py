"""TV along z (``guidance.coupling``), the volume coupling in the driver, and chunked network calls."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from guidance.chunked import ChunkedDenoiser
from guidance.coupling import Coupling, VolumeCoupler, diff_z, diff_z_adjoint, tv_z, tv_z_prox
from guidance.driver import BatchItem, sample_batch, volume_coupler
from guidance.solve import plan_method
from models.checkpoint import builtin_models
from operators.imaging import Inpainting


def objective(u, v, w):
    return 0.5 * float(((u - v) ** 2).sum()) + w * float(tv_z(u))


def reference_prox(v: np.ndarray, w: float) -> np.ndarray:
    """The TV-z prox of one column by an independent route: the dual box-constrained QP
    ``min 1/2 ||v - D^T p||^2, |p| <= w`` solved by L-BFGS-B, then ``u = v - D^T p``."""
    n = len(v)
    dmat = np.diff(np.eye(n), axis=0)  # D: [n - 1, n]

    def f(p):
        r = v - dmat.T @ p
        return 0.5 * r @ r, -dmat @ r

    res = minimize(f, np.zeros(n - 1), jac=True, method="L-BFGS-B", bounds=[(-w, w)] * (n - 1),
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    return v - dmat.T @ res.x


def test_adjoint_of_the_difference():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    p = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    assert torch.allclose((diff_z(u) * p).sum(), (u * diff_z_adjoint(p)).sum())


@pytest.mark.parametrize("w", [0.05, 0.3, 2.0])
def test_prox_matches_an_independent_solver_and_minimises(w):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)  # 5 columns of 6 slices
    u = tv_z_prox(v, w, iters=3000)
    ref = np.stack([reference_prox(v[:, j].numpy(), w) for j in range(v.shape[1])], 1)
    np.testing.assert_allclose(u.numpy(), ref, atol=1e-5)
    best = objective(u, v, w)
    for _ in range(200):  # no nearby point does better
        other = u + 1e-3 * torch.randn(u.shape, generator=g, dtype=torch.float64)
        assert objective(other, v, w) >= best - 1e-12
    assert best < objective(v, v, w)  # and it improves on v itself


def test_few_iterations_are_close_to_the_optimum():
    g = torch.Generator().manual_seed(2)
    v = torch.cumsum(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64) * 0.1, 0)
    exact = objective(tv_z_prox(v, 0.05, iters=5000), v, 0.05)
    few = objective(tv_z_prox(v, 0.05), v, 0.05)  # the default iterations
    assert few <= exact + 1e-3 * abs(exact)


def test_identity_cases():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    assert torch.equal(tv_z_prox(v, 0.0), v)  # weight 0
    const = v[:1].expand(5, -1, -1, -1).clone()  # constant along z
    torch.testing.assert_close(tv_z_prox(const, 0.5), const, rtol=0, atol=1e-12)
    assert torch.equal(tv_z_prox(v[:1], 0.5), v[:1])  # one slice
    per_channel = torch.tensor([0.0, 0.2], dtype=torch.float64).reshape(2, 1, 1)
    u = tv_z_prox(v, per_channel)
    assert torch.equal(u[:, 0], v[:, 0]) and not torch.allclose(u[:, 1], v[:, 1])


def test_coupler_acts_on_each_sample_of_each_volume_alone():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 + 6, 1, 3, 3, generator=g, dtype=torch.float64)
    # a lone item (rows 0, 1), then a volume of 3 slices x 2 samples: slice d, sample k at 2 + 2 d + k
    items = [BatchItem(None, None, 2)] + [BatchItem(None, None, 2, volume="v", coupling=Coupling(weight=0.3))] * 3
    coupler = volume_coupler(items, torch.tensor([2.0]))
    out = coupler(x)
    assert torch.equal(out[:2], x[:2])
    for k in range(2):
        rows = [2 + k, 4 + k, 6 + k]
        torch.testing.assert_close(out[rows], tv_z_prox(x[rows], 0.15))  # weight / scale
    assert volume_coupler(items[:1], torch.tensor([1.0])) is None


def test_coupler_is_straight_through_under_autograd():
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    coupler = VolumeCoupler([(torch.arange(4)[None], 0.5)])
    out = coupler(2 * x)
    torch.testing.assert_close(out.detach(), tv_z_prox(2 * x.detach(), 0.5))
    g, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.full_like(x, 2.0))


class Net(torch.nn.Module):
    """A tiny network with a batch-coupled op nowhere: rows are independent."""

    shape, sigma_min, sigma_max, sigma_data = (1, 4, 4), 0.01, 10.0, 0.5

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
        self.calls = []

    def forward(self, x, sigma):
        self.calls.append(x.shape[0])
        return torch.tanh(self.conv(x)) / (1 + float(sigma))


def test_chunked_calls_equal_one_call_with_and_without_gradients():
    net = Net()
    x = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    whole = net(x, 0.5)
    chunked = ChunkedDenoiser(net, 3)
    net.calls.clear()
    torch.testing.assert_close(chunked(x, 0.5), whole)
    assert net.calls == [3, 3, 3, 1]
    xg = x.clone().requires_grad_(True)
    v = torch.randn_like(x)
    g_whole, = torch.autograd.grad((net(xg, 0.5) * v).sum(), xg)
    out = chunked(xg, 0.5)
    g1, = torch.autograd.grad((out * v).sum(), xg, retain_graph=True)
    g2, = torch.autograd.grad((out * v).sum(), xg)  # a second backprop (fast's CG takes several)
    torch.testing.assert_close(g1, g_whole)
    torch.testing.assert_close(g2, g_whole)


@pytest.fixture(scope="module")
def grf():
    return builtin_models()["grf-32"]


def _stack(model, d: int, coupling=None, num_samples: int = 2):
    op = Inpainting((1, 32, 32), (torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.4).double())
    x = model.denoiser.sample_prior(1, torch.Generator().manual_seed(1))[0]
    ys = [op.observed(op.forward((x * (1 + 0.1 * k))[None]))[0] for k in range(d)]
    return [BatchItem(op, y, num_samples, seed=7, volume="vol", coupling=coupling) for y in ys]


def test_driver_chunks_give_the_unchunked_samples(grf):
    plan = plan_method(grf.card, grf.denoiser, "fast", {"steps": 6})
    items = _stack(grf, 5)
    whole = sample_batch(grf, plan, items, noise_sigma=0.05)
    chunked = sample_batch(grf, plan, items, noise_sigma=0.05, chunk=3)
    assert chunked.nfe == whole.nfe == plan.config.cost().network_calls
    for a, b in zip(whole.samples, chunked.samples):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_driver_coupling_makes_slices_agree(grf):
    plan = plan_method(grf.card, grf.denoiser, "fast", {"steps": 6})
    free = sample_batch(grf, plan, _stack(grf, 6, None), noise_sigma=0.05)
    zero = sample_batch(grf, plan, _stack(grf, 6, Coupling(weight=0.0)), noise_sigma=0.05)
    tied = sample_batch(grf, plan, _stack(grf, 6, Coupling(weight=1.0)), noise_sigma=0.05)
    for a, b in zip(free.samples, zero.samples):
        assert torch.equal(a, b)  # weight 0: no coupling at all
    tv = [float(tv_z(torch.stack([s[k] for s in run.samples]))) for run in (free, tied) for k in range(2)]
    assert max(tv[2:]) < 0.7 * min(tv[:2])  # each sample's volume varies less along z
