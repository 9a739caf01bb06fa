"""The denoiser contract: schedules, preconditioning wrappers, the exact GRF denoiser, checkpoints."""
import math

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.denoiser import EDMPrecond, VEDenoiser, VPDenoiser
from models.grf import GRFDenoiser, grf_spectrum
from models.schedules import (ddpm_linear_alphas_cumprod, get_sigmas, get_sigmas_karras,
                              sigmas_from_alphas_cumprod, vp_sigma)
from models.unet import UNet


@pytest.mark.parametrize("name", ["karras", "ve", "vp_linear", "vp_cosine"])
def test_schedules_decrease_to_zero(name):
    s = get_sigmas(name, 25, 0.002, 80.0)
    assert s.shape == (26,) and s[-1] == 0 and bool((s[:-1] > 0).all())
    assert bool((s[1:] < s[:-1]).all() if name != "vp_linear" else (s[1:] <= s[:-1]).all())
    assert float(s[0]) <= 80.0 + 1e-9 and float(s[-2]) >= 0.002 - 1e-9


def test_karras_endpoints_and_vp_relation():
    s = get_sigmas_karras(10, 0.002, 80.0)
    assert math.isclose(float(s[0]), 80.0) and math.isclose(float(s[9]), 0.002)
    t = torch.tensor([0.3], dtype=torch.float64)
    abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t ** 2))
    assert torch.allclose(vp_sigma(t), torch.sqrt((1 - abar) / abar))


class Linear(torch.nn.Module):
    """A network whose output we know: out = a * x + b * t."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x + 0.01 * t.view(-1, 1, 1, 1)


def test_vp_wrapper_all_parameterizations():
    abar = ddpm_linear_alphas_cumprod()
    sig = sigmas_from_alphas_cumprod(abar)
    k = 300
    s = float(sig[k])
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x_t = x / math.sqrt(1 + s ** 2)
    a, b = math.sqrt(abar[k]), math.sqrt(1 - abar[k])
    net = Linear()
    out = net(x_t, torch.full((2,), float(k), dtype=torch.float64))
    # eps = -sqrt(1 - abar) * score of x_t
    expect = {"eps": x - s * out, "v": a * x_t - b * out, "x0": out, "score": x + s * b * out}
    for p, e in expect.items():
        d = VPDenoiser(net, abar, (1, 4, 4), parameterization=p)
        assert abs(float(d.sigma_to_t(torch.tensor([s], dtype=torch.float64))) - k) < 1e-6
        torch.testing.assert_close(d(x, s), e, rtol=1e-10, atol=1e-10)


def test_ve_wrapper():
    net = Linear()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = net(x, torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(VEDenoiser(net, (1, 4, 4), "score")(x, 0.5), x + 0.25 * out)
    torch.testing.assert_close(VEDenoiser(net, (1, 4, 4), "eps")(x, 0.5), x - 0.5 * out)


def test_edm_preconditioning_is_exact_for_gaussian_data():
    """With F = 0 the EDM denoiser is c_skip x: the MMSE denoiser of N(0, sigma_data^2) data."""
    class Zero(torch.nn.Module):
        def forward(self, x, c):
            return torch.zeros_like(x)
    d = EDMPrecond(Zero(), (1, 4, 4), sigma_data=0.5)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(d(x, 2.0), x * 0.25 / (4 + 0.25))


def test_grf_spectrum_and_exact_denoiser():
    lam = grf_spectrum(32)
    assert math.isclose(float(lam.mean()), 1.0, rel_tol=1e-12)
    assert float(lam[0, 0]) == float(lam.max())
    den = GRFDenoiser(32)
    cov = den.covariance()
    assert np.allclose(np.diag(cov), 1.0)  # unit pixel variance
    # D(x, sigma) = Sigma (Sigma + sigma^2 I)^{-1} x, by dense algebra
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = cov @ np.linalg.solve(cov + 0.49 * np.eye(1024), x.reshape(-1).numpy())
    np.testing.assert_allclose(den(x, 0.7).reshape(-1).numpy(), dense, rtol=1e-8, atol=1e-10)
    # prior samples have the stated covariance (pixel variance 1 up to sampling error)
    xs = den.sample_prior(4000, torch.Generator().manual_seed(1))
    assert abs(float(xs.var()) - 1.0) < 0.1


def test_checkpoint_round_trip(tmp_path):
    net = UNet(in_channels=2, base=8, channel_mult=(1, 2), attention=False)
    card = {"id": "tiny", "kind": "pde", "shape": [2, 16, 16], "channels": ["a", "u"],
            "architecture": {"name": "unet", "args": {"in_channels": 2, "base": 8, "channel_mult": [1, 2],
                                                      "attention": False}},
            "parameterization": {"kind": "edm", "sigma_data": 0.5},
            "normalization": {"shift": [7.5, 0.0], "scale": [9.0, 0.02]}}
    save_checkpoint(tmp_path / "tiny", net, card)
    m = load_checkpoint(tmp_path / "tiny")
    x = torch.randn(2, 2, 16, 16)
    ref = EDMPrecond(net, (2, 16, 16))
    torch.testing.assert_close(m.denoiser(x, 1.3), ref(x, 1.3))
    assert m.scale.tolist() == [9.0, 0.02]
    (tmp_path / "tiny" / "card.json").write_text("{}")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "tiny")


def test_flow_denoiser_maps_the_exact_velocity_to_the_exact_denoiser():
    # x0 ~ N(0, sd^2 I) and x_t = (1 - t) x0 + t z: E[z - x0 | x_t] = (t - (1 - t) sd^2) / var(x_t) x_t.
    # Through x0 = x_t - t v, sigma = t / (1 - t), x = x_t / (1 - t) it must equal sd^2 / (sd^2 + sigma^2) x.
    from models.denoiser import FlowDenoiser
    sd = 0.5

    class ExactVelocity(torch.nn.Module):
        def forward(self, x_t, c_noise):
            s = torch.exp(4 * c_noise)
            t = (s / (1 + s)).view(-1, 1, 1, 1)
            var = (1 - t) ** 2 * sd ** 2 + t ** 2
            return (t - (1 - t) * sd ** 2) / var * x_t

    d = FlowDenoiser(ExactVelocity().double(), (1, 8, 8))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    want = (sd ** 2 / (sd ** 2 + sigma ** 2)).view(-1, 1, 1, 1) * x
    torch.testing.assert_close(d(x, sigma), want, rtol=1e-10, atol=1e-12)
