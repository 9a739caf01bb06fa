"""The whitened data misfit and the ``misfit`` flag (guidance.solve.misfit_metrics), on the
analytic grf-32 prior whose posterior is known exactly."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2

from guidance.exact import dense_matrix, gaussian_posterior
from guidance.solve import MISFIT_ALPHA, MISFIT_FLOOR, misfit_metrics, misfit_threshold, observed_count, solve
from models.checkpoint import builtin_models
from operators.imaging import Inpainting, SparsePoints, SuperResolution
from operators.sensing import MRI, CompressedSensing

NOISE = 0.1


@pytest.fixture(scope="module")
def grf():
    model = builtin_models()["grf-32"]
    return model, model.denoiser.covariance()


def inpainting(seed=0, fraction=0.25):
    g = torch.Generator().manual_seed(seed)
    return Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < fraction).double())


def observe(op, x, seed, sigma=NOISE):
    """``A(x) + noise`` with the unobserved entries zeroed (as the service and ``solve`` do)."""
    y = op.forward(x[None])[0]
    y = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return op.observed(y[None])[0]


def checkerboard(amplitude=1.0):
    """The sharpest pattern on the grid: the prior gives it almost no variance."""
    i = torch.arange(32)
    return amplitude * ((-1.0) ** (i[:, None] + i[None, :])).double()[None]


def test_exact_posterior_samples_have_whitened_misfit_one(grf):
    """Data from the model, exact posterior samples (dense linear algebra): the mean whitened
    misfit is 1 (here 10 observations x 8 samples: standard error about 0.03). Without the
    whitening it would be sigma^2 = 0.01; with m the pixel count instead of the 25 % observed, 0.23."""
    model, cov = grf
    op = inpainting()
    a = dense_matrix(op)
    rows = np.abs(a).sum(1) > 0
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(1)
    means = []
    for t in range(10):
        x0 = model.denoiser.sample_prior(1, g)[0]
        y = observe(op, x0, seed=100 + t)
        mean, c = gaussian_posterior(cov, a[rows], y.reshape(-1).numpy()[rows], NOISE)
        chol = np.linalg.cholesky(c + 1e-10 * np.eye(len(c)))
        xs = torch.as_tensor(mean + (chol @ rng.standard_normal((len(c), 8))).T).reshape(8, 1, 32, 32)
        met = misfit_metrics(op, y, xs, NOISE)
        assert met["observed_values"] == int(rows.sum()) < 1024 // 2
        assert len(met["whitened_misfit"]) == 8 and met["misfit"] is False
        means.append(np.mean(met["whitened_misfit"]))
    assert abs(np.mean(means) - 1.0) < 0.1, means


def test_the_sampler_flags_an_observation_the_prior_cannot_explain(grf):
    """solve() on grf-32 (its default method, ALD, and fast): the flag is clear for an observation
    drawn from the model at the stated noise and set for a sharp checkerboard, with a real margin."""
    model, _ = grf
    op, sigma = inpainting(), 0.2  # (ALD's misfit on data from the model: 1.2-1.5 here, 1.5-1.9 at 0.1)
    x0 = model.denoiser.sample_prior(1, torch.Generator().manual_seed(5))[0]
    for method in ("ald", "fast"):
        inside = solve(model, op, observe(op, x0, seed=7, sigma=sigma).numpy(), noise_sigma=sigma,
                       num_samples=2, seed=1, method=method).metrics
        outside = solve(model, op, observe(op, checkerboard(), seed=7, sigma=sigma).numpy(), noise_sigma=sigma,
                        num_samples=2, seed=1, method=method).metrics
        assert inside["misfit"] is False and outside["misfit"] is True, (method, inside, outside)
        assert 0.4 < np.mean(inside["whitened_misfit"]) < 1.6, (method, inside)
        assert np.mean(outside["whitened_misfit"]) > 3 * inside["misfit_threshold"], (method, outside)
        assert inside["observed_values"] == int(op.mask.sum())


def test_no_noise_no_misfit(grf):
    model, _ = grf
    op = inpainting()
    met = solve(model, op, observe(op, checkerboard(), seed=1, sigma=0.0).numpy(), noise_sigma=0.0,
                method="fast", params={"steps": 4}).metrics
    assert met["whitened_misfit"] is None and met["misfit"] is None and met["misfit_threshold"] is None
    assert met["data_residual"] is not None


def test_threshold_rule():
    """max(floor, chi-square quantile / m): a false alarm of an exact posterior sample has
    probability at most MISFIT_ALPHA for every m; the floor applies where m is large."""
    for m in (1, 2, 5, 17, 100, 256, 1000, 4096, 196608):
        t = misfit_threshold(m)
        assert t >= MISFIT_FLOOR
        assert chi2.sf(t * m, m) <= MISFIT_ALPHA * 1.0001
    assert misfit_threshold(1) > 20 and misfit_threshold(4096) == MISFIT_FLOOR


def test_observed_values_count_what_the_operator_produces():
    mask3 = torch.zeros((3, 8, 8))
    mask3[0, :2] = 1
    mask3[2, :, :1] = 1
    assert observed_count(Inpainting((3, 8, 8), mask3), torch.zeros(3, 8, 8)) == 16 + 8
    assert observed_count(Inpainting((3, 8, 8), mask3[0]), torch.zeros(3, 8, 8)) == 3 * 16
    kmask = torch.zeros((8, 8))
    kmask[:, :3] = 1
    assert observed_count(MRI((1, 8, 8), kmask), torch.zeros(2, 8, 8)) == 2 * 24  # real and imaginary
    assert observed_count(SparsePoints((3, 8, 8), [[0, 1, 1], [2, 3, 3], [2, 3, 3]]), torch.zeros(3)) == 3
    assert observed_count(SuperResolution((3, 8, 8), 2), torch.zeros(3, 4, 4)) == 48
    assert observed_count(CompressedSensing((3, 8, 8), m=5, seed=0), torch.zeros(5)) == 5


def test_misfit_is_per_sample_and_whitened():
    """A residual of known size: sample k misses by k * sigma on every one of m values."""
    op = SuperResolution((1, 8, 8), 2)
    y = torch.zeros((1, 4, 4), dtype=torch.float64)
    xs = torch.stack([torch.full((1, 8, 8), k * 0.3, dtype=torch.float64) for k in range(3)])
    met = misfit_metrics(op, y, xs, 0.3)
    np.testing.assert_allclose(met["whitened_misfit"], [0.0, 1.0, 4.0])
    assert met["observed_values"] == 16 and met["misfit"] is False  # mean 5/3 < threshold
