"""Every method on CUDA (skipped without a GPU: ``tests/conftest.py``). ``bash bench/gpu_device.sh``
runs these on a lent GPU machine.

float32 state on the device, random numbers drawn there from per-job generators (a job batched
with others draws what it draws alone), the samples as good a posterior as on the CPU (the
exact-posterior check of ALD in float32), no host-device synchronisation inside a step (CUDA's
sync debug mode, on a device-resident operator), and the network options (bf16 autocast,
channels_last).
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu as gpu_bench
from guidance.core import CHECK_EVERY, SplitGenerator, make_generator
from guidance.driver import BatchItem, sample_batch
from guidance.exact import dense_matrix, gaussian_posterior
from guidance.registry import METHODS
from guidance.solve import plan_method, solve
from models.checkpoint import LoadedModel, builtin_models, default_checkpoint_dir, load_checkpoint
from models.denoiser import NetworkOptions, configure_network
from models.grf import GRFDenoiser
from models.schedules import get_sigmas
from operators.base import LinearOperator
from operators.blur import Blur
from operators.imaging import Inpainting

pytestmark = pytest.mark.cuda

DEV = "cuda"
METHOD_NAMES = ["fast", "dps", "ald", "diffusion_pde"]
STEPS = {"fast": 20, "dps": 30, "ald": 15, "diffusion_pde": 15}
NOISE = 0.05


def params_for(method, steps=None):
    p = {"steps": steps or STEPS[method]}
    if method == "ald":
        p["final_corrector_steps"] = 20
    return p


@pytest.fixture(scope="module")
def grf():
    m = builtin_models()["grf-32"]
    return LoadedModel(m.card, m.denoiser.to(DEV))


#: grf-32 on the CPU: its prior samples and covariance (the one above is on the GPU).
GRF_CPU = GRFDenoiser(32)


@pytest.fixture(scope="module")
def phantom():
    return load_checkpoint(default_checkpoint_dir() / "phantom-64", DEV)


@pytest.fixture(scope="module")
def grf_problem():
    g = torch.Generator().manual_seed(0)
    x = GRF_CPU.sample_prior(1, g)[0]
    op = Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < 0.3).double())
    y = op.forward(x[None])[0] + NOISE * torch.randn((1, 32, 32), generator=g, dtype=torch.float64)
    return op, y


def rel_residual(op, y, xs):
    r = (y[None] - op.forward(torch.as_tensor(xs, dtype=torch.float64))).flatten(1).norm(dim=1)
    return (r / y.norm()).numpy()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_on_cuda(grf, grf_problem, method):
    """As test_samplers.test_seeds_and_guidance, on the GPU: reproducible per seed, samples that
    differ within a batch, and guided by the data."""
    op, y = grf_problem
    kw = dict(noise_sigma=NOISE, method=method, params=params_for(method), num_samples=3, device=DEV)
    a = solve(grf, op, y, seed=7, **kw)
    b = solve(grf, op, y, seed=7, **kw)
    c = solve(grf, op, y, seed=8, **kw)
    np.testing.assert_allclose(a.samples, b.samples, rtol=0, atol=1e-5)
    assert np.isfinite(a.samples).all()
    assert np.abs(a.samples - c.samples).max() > 1e-3
    assert np.abs(a.samples[0] - a.samples[1]).max() > 1e-3
    prior = GRF_CPU.sample_prior(3, torch.Generator().manual_seed(1)).float().numpy()
    guided, unguided = rel_residual(op, y, a.samples).max(), rel_residual(op, y, prior).min()
    assert guided < 0.3 * unguided, (guided, unguided)
    assert a.metrics["data_residual"] < 0.3


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_phantom_unet_on_cuda_float32_and_batching(phantom, method):
    """The trained U-Net on the GPU: float32 samples on the device; jobs batched together (each
    its own operator, or one shared SVD for ALD) get what they get alone, to float32 rounding of
    the network at another batch size."""
    g = torch.Generator().manual_seed(3)
    ops = [Inpainting((1, 64, 64), (torch.rand((64, 64), generator=g) < f).double()) for f in (0.3, 0.5)]
    if method == "ald":
        ops = [ops[0], ops[0]]
    x = torch.rand((1, 1, 64, 64), generator=g, dtype=torch.float64)
    items = [BatchItem(op, op.forward(x)[0] + NOISE * torch.randn((1, 64, 64), generator=g, dtype=torch.float64),
                       k, 10 + j) for j, (op, k) in enumerate(zip(ops, (2, 1)))]
    plan = plan_method(phantom.card, phantom.denoiser, method, params_for(method, 8))
    run = sample_batch(phantom, plan, items, noise_sigma=NOISE, device=DEV, shared_svd=method == "ald")
    for s, it in zip(run.samples, items):
        assert s.device.type == "cuda" and s.dtype == torch.float32 and s.shape == (it.num_samples, 1, 64, 64)
        assert torch.isfinite(s).all()
    assert run.nfe == plan.config.cost().network_calls or method == "ald"
    for it, batched in zip(items, run.samples):
        alone = sample_batch(phantom, plan, [it], noise_sigma=NOISE, device=DEV).samples[0]
        # (another stream would differ by O(1); cuDNN's kernels differ with the batch size)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-2)


def test_generators_live_on_the_device():
    gen = SplitGenerator([(make_generator(1, DEV), 2), (make_generator(2, DEV), 3)])
    z = gen.randn((5, 4, 4), torch.float32, DEV)
    assert z.device.type == "cuda"
    alone = SplitGenerator([(make_generator(2, DEV), 3)]).randn((3, 4, 4), torch.float32, DEV)
    assert torch.equal(z[2:], alone)
    direct = torch.randn((3, 4, 4), generator=torch.Generator(device=DEV).manual_seed(2), device=DEV)
    assert torch.equal(alone, direct)


def test_ald_float32_on_cuda_matches_the_exact_posterior(grf):
    """float32 is enough where float64 is not needed: ALD's defaults on the GPU against the exact
    posterior of grf-32 under circular blur (as test_exact_posterior does on the CPU)."""
    den = grf.denoiser
    cov = GRF_CPU.covariance()
    g = torch.Generator().manual_seed(0)
    x_true = GRF_CPU.sample_prior(1, g)
    op = Blur((1, 32, 32), gaussian={"sigma": 1.5, "size": 7}, boundary="circular")
    y = op.forward(x_true) + 0.1 * torch.randn(op.forward(x_true).shape, generator=g, dtype=torch.float64)
    a = dense_matrix(op)
    mean, c = gaussian_posterior(cov, a, y.reshape(-1).numpy(), 0.1)
    std = np.sqrt(np.clip(np.diag(c), 0, None))
    m = METHODS["ald"]
    cfg = m.make_config({})
    sig = get_sigmas(cfg.schedule, cfg.steps, den.sigma_min, den.sigma_max)
    yd = y.to(DEV, torch.float32).expand((32,) + y.shape[1:]).clone()
    xs = m.sampler(den, op, yd, sig, config=cfg, noise_sigma=0.1,
                   generator=SplitGenerator([(make_generator(1, DEV), 32)]))
    assert xs.dtype == torch.float32 and xs.device.type == "cuda"
    xs = xs.double().cpu().reshape(32, -1).numpy()
    err = np.linalg.norm(xs.mean(0) - mean) / np.linalg.norm(mean)
    ratio = np.median(xs.std(0, ddof=1)) / np.median(std)
    assert err < 0.10 and 0.8 < ratio < 1.2, (err, ratio)


# ----------------------------------------------------------------------------- synchronisation
class DeviceMask(LinearOperator):
    """Inpainting with its mask already on the device (no host copy per call), so what is
    counted below is the samplers' own synchronisations."""

    kind = "device_mask"
    row_gram = 1.0

    def __init__(self, mask):
        super().__init__(tuple(mask.shape))
        self.mask = mask

    @property
    def obs_shape(self):
        return self.in_shape

    def forward(self, x):
        return self.mask * x

    def adjoint(self, y):
        return self.mask * y

    def pseudo_inverse(self, y):
        return self.mask * y

    def prox(self, z, y, rho):
        r = rho if isinstance(rho, (int, float)) else rho.view(-1, 1, 1, 1)
        return (self.mask * y + r * z) / (self.mask + r)


def count_syncs(fn) -> int:
    return gpu_bench.count_syncs(fn, torch.device("cuda"))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_host_sync_inside_a_step(grf, method):
    """Doubling the steps adds at most the deferred finiteness reads (one per CHECK_EVERY steps):
    nothing in a step waits for the device."""
    mask = (torch.rand((1, 32, 32), generator=torch.Generator().manual_seed(0)) < 0.3).float().to(DEV)
    op = DeviceMask(mask)
    y = (mask * torch.randn((4, 1, 32, 32), generator=torch.Generator(device=DEV).manual_seed(1), device=DEV))

    def run(steps):
        cfg = METHODS[method].make_config({**params_for(method, steps), "final_corrector_steps": 2}
                                          if method == "ald" else params_for(method, steps))
        sig = get_sigmas(cfg.schedule, cfg.steps, grf.denoiser.sigma_min, grf.denoiser.sigma_max)
        gen = SplitGenerator([(make_generator(0, DEV), 4)])
        return lambda: METHODS[method].sampler(grf.denoiser, op, y, sig, config=cfg, generator=gen,
                                               noise_sigma=NOISE, callback=lambda e: None)

    run(4)()  # warm-up
    s = 32
    n1, n2 = count_syncs(run(s)), count_syncs(run(2 * s))
    allowed = math.ceil(s / CHECK_EVERY) + 2
    assert n2 - n1 <= allowed, f"{method}: {n2 - n1} synchronisations for {s} more steps"


# ----------------------------------------------------------------------------- network options
@pytest.mark.parametrize("method", ["fast", "dps"])
def test_bf16_autocast_and_channels_last(phantom, method):
    """bf16 autocast and channels_last give the same run as fp32 to bf16 rounding (same seed, same
    device: the same noise), and leave the state float32."""
    g = torch.Generator().manual_seed(5)
    op = Inpainting((1, 64, 64), (torch.rand((64, 64), generator=g) < 0.3).double())
    x = torch.rand((1, 1, 64, 64), generator=g, dtype=torch.float64)
    items = [BatchItem(op, op.forward(x)[0], 2, 3)]
    plan = plan_method(phantom.card, phantom.denoiser, method, params_for(method, 10))
    ref = sample_batch(phantom, plan, items, noise_sigma=NOISE, device=DEV).samples[0]
    try:
        for opts in (NetworkOptions(channels_last=True), NetworkOptions(autocast="bf16", channels_last=True),
                     NetworkOptions(autocast="fp16")):
            configure_network(phantom.denoiser, opts)
            out = sample_batch(phantom, plan, items, noise_sigma=NOISE, device=DEV).samples[0]
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            corr = np.corrcoef(out.flatten().cpu().numpy(), ref.flatten().cpu().numpy())[0, 1]
            assert corr > 0.9, (opts, corr)
            if opts.autocast is None:
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)
    finally:
        configure_network(phantom.denoiser, NetworkOptions())
