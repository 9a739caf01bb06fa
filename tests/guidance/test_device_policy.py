"""The device policy of the sampling path, checked on the CPU: state dtype, deferred finiteness
checks, per-job generators, sigma tensors filled on the device, and the network options
(autocast, channels_last, torch.compile). The CUDA runs themselves are in test_cuda.py."""
import functools

import numpy as np
import pytest
import torch

import guidance.samplers as samplers
from guidance.core import DivergedError, Progress, SplitGenerator, levels, make_generator, state_dtype
from guidance.driver import BatchItem, sample_batch
from guidance.solve import plan_method, solve
from models.checkpoint import builtin_models
from models.denoiser import (CountingDenoiser, EDMPrecond, NetworkOptions, configure_network,
                             sigma_batch)
from models.unet import UNet
from operators.imaging import Inpainting

NOISE = 0.05


@pytest.fixture(scope="module")
def grf():
    return builtin_models()["grf-32"]


def problem(model, seed, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    op = Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < frac).double())
    x = model.denoiser.sample_prior(1, g)
    return op, op.forward(x)[0] + NOISE * torch.randn((1, 32, 32), generator=g, dtype=torch.float64)


def test_state_dtype_is_a_function_of_the_device():
    assert state_dtype("cpu") is torch.float64
    assert state_dtype("cuda") is torch.float32
    assert state_dtype(torch.device("cuda", 1)) is torch.float32
    assert state_dtype("cuda", "float64") is torch.float64
    assert state_dtype("cpu", torch.float32) is torch.float32
    with pytest.raises(ValueError):
        state_dtype("cpu", "float16")


def test_float32_state_when_asked(grf):
    """``dtype`` overrides the device's default: float32 on the CPU (what CUDA runs) samples in
    float32, reproducibly, and a job batched with another gets what it gets alone."""
    plan = plan_method(grf.card, grf.denoiser, "fast", {"steps": 8})
    (op1, y1), (op2, y2) = problem(grf, 1), problem(grf, 2, 0.5)
    items = [BatchItem(op1, y1, 2, 5), BatchItem(op2, y2, 1, 6)]
    run = sample_batch(grf, plan, items, noise_sigma=NOISE, dtype="float32")
    assert [s.dtype for s in run.samples] == [torch.float32, torch.float32]
    assert all(torch.isfinite(s).all() for s in run.samples)
    again = sample_batch(grf, plan, items, noise_sigma=NOISE, dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(run.samples, again.samples))
    for item, batched in zip(items, run.samples):
        alone = sample_batch(grf, plan, [item], noise_sigma=NOISE, dtype="float32").samples[0]
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    # and it is a posterior sample as good as the float64 one: the data fit is the same
    run64 = sample_batch(grf, plan, items, noise_sigma=NOISE)
    assert run64.samples[0].dtype == torch.float64
    fit32 = (op1.forward(run.samples[0].double()) - y1).norm() / y1.norm()
    fit64 = (op1.forward(run64.samples[0]) - y1).norm() / y1.norm()
    assert abs(float(fit32) - float(fit64)) < 0.05 and float(fit32) < 0.3


def test_generators_are_per_job_on_the_given_device():
    g = make_generator(7, "cpu")
    assert g.device.type == "cpu" and g.initial_seed() == 7
    a = SplitGenerator([(make_generator(1, "cpu"), 2), (make_generator(2, "cpu"), 3)]).randn(
        (5, 4), torch.float32, "cpu")
    alone = SplitGenerator([(make_generator(2, "cpu"), 3)]).randn((3, 4), torch.float32, "cpu")
    assert torch.equal(a[2:], alone)
    with pytest.raises(ValueError):
        SplitGenerator([(make_generator(1, "cpu"), 2)]).randn((3, 4), torch.float32, "cpu")


def test_levels_reads_the_schedule_once():
    sig = torch.tensor([80.0, 1.5, 0.0], dtype=torch.float64)
    assert levels(sig) == [80.0, 1.5, 0.0]
    assert levels(sig.float()) == [float(s) for s in sig.float()]


def test_sigma_is_filled_not_copied():
    x = torch.zeros((3, 1, 4, 4), dtype=torch.float32)
    s = sigma_batch(0.7, x)
    assert s.dtype == torch.float64 and s.shape == (3,) and torch.equal(s, torch.full((3,), 0.7, dtype=torch.float64))
    assert torch.equal(sigma_batch(torch.tensor([0.1, 0.2, 0.3]), x), torch.tensor([0.1, 0.2, 0.3]).double())
    assert torch.equal(sigma_batch(torch.tensor(0.5), x), torch.full((3,), 0.5, dtype=torch.float64))


# ----------------------------------------------------------------------------- finiteness
def test_deferred_check_stops_late_and_names_the_step():
    """Off the CPU the check is read every ``check_every`` steps (one synchronisation each)."""
    good = torch.zeros((2, 1, 4, 4))
    bad = torch.full_like(good, float("nan"))
    calls = []
    p = Progress(lambda e: calls.append(e["i"]), 40, good, check_every=16, eager=False)
    for i in range(15):
        p(i, 1.0, bad if i == 5 else good, good)  # recorded, not yet read
    assert calls == list(range(15))
    with pytest.raises(DivergedError, match="step 5"):
        p(15, 1.0, good, good)
    # a divergence after the last periodic read is found by done()
    p = Progress(None, 20, good, check_every=16, eager=False)
    for i in range(20):
        p(i, 1.0, bad if i == 18 else good, good)
    with pytest.raises(DivergedError, match="step 18"):
        p.done(good)
    p = Progress(None, 3, good, eager=False)
    for i in range(3):
        p(i, 1.0, good, good)
    assert p.done(good) is good
    # on the CPU: at once
    p = Progress(None, 40, good)
    with pytest.raises(DivergedError, match="step 2"):
        p(2, 1.0, bad, good)


@pytest.mark.parametrize("method", ["fast", "dps", "ald", "diffusion_pde"])
def test_samplers_with_the_deferred_check(grf, monkeypatch, method):
    """Every sampler run with the accelerator's deferred check (forced on the CPU) gives the same
    samples, and a diverging run still raises."""
    params = {"steps": 6, **({"final_corrector_steps": 3} if method == "ald" else {})}
    op, y = problem(grf, 3)
    eager = solve(grf, op, y, noise_sigma=NOISE, method=method, params=params, num_samples=2, seed=4)
    monkeypatch.setattr(samplers, "Progress", functools.partial(Progress, eager=False, check_every=4))
    deferred = solve(grf, op, y, noise_sigma=NOISE, method=method, params=params, num_samples=2, seed=4)
    np.testing.assert_array_equal(eager.samples, deferred.samples)
    bad = torch.full_like(y, float("nan"))
    with pytest.raises(DivergedError):
        solve(grf, op, bad, noise_sigma=NOISE, method=method, params=params, num_samples=1, seed=4)


# ----------------------------------------------------------------------------- network options
def small_edm():
    torch.manual_seed(0)
    net = UNet(in_channels=2, base=8, channel_mult=(1, 2), attention=True)
    for p in net.parameters():  # the U-Net zero-initialises its last layers: make it do something
        p.data.normal_(0, 0.1)
    return EDMPrecond(net, (2, 16, 16)).eval()


def test_network_options():
    den = small_edm()
    keys = set(den.state_dict())
    x = torch.randn((3, 2, 16, 16), dtype=torch.float64)
    ref = den(x, 0.8)
    assert den.options == NetworkOptions()

    counting = CountingDenoiser(den)
    configure_network(counting, channels_last=True)  # passed on to the wrapped denoiser
    assert den.options.channels_last
    assert den.net.inp.weight.is_contiguous(memory_format=torch.channels_last)
    out = counting(x, 0.8)
    assert out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    configure_network(den, channels_last=True)  # idempotent
    torch.testing.assert_close(den(x, 0.8), ref, rtol=1e-5, atol=1e-6)

    configure_network(den, autocast="bf16")  # CUDA only: ignored on the CPU
    assert den.net.inp.weight.is_contiguous()  # channels_last off again: weights back to NCHW
    assert torch.equal(den(x, 0.8), ref)

    configure_network(den, compile=True)  # compiled lazily, kept out of the module tree
    assert "_compiled_net" in den.__dict__ and set(den.state_dict()) == keys
    configure_network(den, NetworkOptions())
    assert "_compiled_net" not in den.__dict__ and den.options == NetworkOptions()
    assert torch.equal(den(x, 0.8), ref)

    with pytest.raises(ValueError):
        NetworkOptions(autocast="int8")
    # analytic denoisers have no network: unchanged
    grf = builtin_models()["grf-32"].denoiser
    assert configure_network(grf, channels_last=True) is grf and grf.options == NetworkOptions()
