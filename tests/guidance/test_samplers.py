"""Determinism, guidance effect, nfe accounting, cancellation and divergence for every method."""
import numpy as np
import pytest
import torch

from guidance.core import DivergedError, SplitGenerator
from guidance.registry import METHODS
from guidance.solve import solve
from models.checkpoint import builtin_models
from models.denoiser import CountingDenoiser
from models.schedules import get_sigmas
from operators.imaging import Inpainting

STEPS = {"fast": 20, "dps": 30, "ald": 15, "diffusion_pde": 15}


@pytest.fixture(scope="module")
def setup():
    model = builtin_models()["grf-32"]
    g = torch.Generator().manual_seed(0)
    x = model.denoiser.sample_prior(1, g)[0]
    op = Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < 0.3).double())
    y = op.forward(x[None])[0] + 0.05 * torch.randn((1, 32, 32), generator=g, dtype=torch.float64)
    return model, op, y


def rel_residual(op, y, xs):
    r = (y[None] - op.forward(torch.as_tensor(xs, dtype=torch.float64))).flatten(1).norm(dim=1)
    return (r / y.norm()).numpy()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_seeds_and_guidance(setup, method):
    model, op, y = setup
    params = {"steps": STEPS[method]}
    if method == "ald":
        params["final_corrector_steps"] = 20
    a = solve(model, op, y, noise_sigma=0.05, method=method, params=params, num_samples=3, seed=7)
    b = solve(model, op, y, noise_sigma=0.05, method=method, params=params, num_samples=3, seed=7)
    c = solve(model, op, y, noise_sigma=0.05, method=method, params=params, num_samples=3, seed=8)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert np.abs(a.samples - c.samples).max() > 1e-3
    assert np.abs(a.samples[0] - a.samples[1]).max() > 1e-3  # samples differ within a batch
    prior = model.denoiser.sample_prior(3, torch.Generator().manual_seed(1)).float().numpy()
    guided, unguided = rel_residual(op, y, a.samples).max(), rel_residual(op, y, prior).min()
    assert guided < 0.3 * unguided, (guided, unguided)
    assert a.method["name"] == method and a.method["steps"] == STEPS[method]
    assert a.metrics["data_residual"] < 0.3


def test_nfe_counts_network_calls(setup):
    model, op, y = setup
    assert solve(model, op, y, method="fast", params={"steps": 12}).nfe == 12
    assert solve(model, op, y, method="dps", params={"steps": 12}).nfe == 12
    assert solve(model, op, y, method="diffusion_pde", params={"steps": 12}).nfe == 2 * 12 - 1  # Heun, last step Euler
    ald = solve(model, op, y, noise_sigma=0.05, method="ald",
                params={"steps": 12, "corrector_steps": 2, "final_corrector_steps": 5})
    assert ald.nfe == (12 + 1) * 3 + (5 - 2)  # matched level inserted; its corrector runs longer


def test_split_generator_makes_batching_invisible(setup):
    model, op, y = setup
    m = METHODS["fast"]
    cfg = m.make_config({"steps": 10})
    sig = get_sigmas(cfg.schedule, cfg.steps, 0.002, 80.0)
    yy = y[None].expand(2, -1, -1, -1).clone()
    alone = m.sampler(model.denoiser, op, yy, sig, config=cfg, generator=SplitGenerator([(torch.Generator().manual_seed(5), 2)]))
    both = m.sampler(model.denoiser, op, torch.cat([yy, yy]), sig, config=cfg,
                     generator=SplitGenerator([(torch.Generator().manual_seed(5), 2), (torch.Generator().manual_seed(6), 2)]))
    torch.testing.assert_close(both[:2], alone, rtol=0, atol=1e-12)


def test_callback_progress_and_cancel(setup):
    model, op, y = setup
    seen = []
    solve(model, op, y, method="fast", params={"steps": 8}, callback=lambda e: seen.append((e["i"], e["total"])))
    assert seen == [(i, 8) for i in range(8)]

    class Cancelled(Exception):
        pass

    def cancel(e):
        if e["i"] == 2:
            raise Cancelled
    den = CountingDenoiser(model.denoiser)
    with pytest.raises(Cancelled):
        METHODS["fast"].sampler(den, op, y[None], get_sigmas("karras", 8, 0.002, 80.0),
                                config=METHODS["fast"].make_config({}), generator=None, callback=cancel)
    assert den.nfe == 3


def test_non_finite_state_stops_the_run(setup):
    model, op, y = setup
    bad = y.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DivergedError):
        solve(model, op, bad, method="dps", params={"steps": 5})


def test_bad_method_parameters(setup):
    with pytest.raises(ValueError):
        METHODS["dps"].make_config({"steps": 0})
    with pytest.raises(ValueError):
        METHODS["dps"].make_config({"nonsense": 1})
    with pytest.raises(ValueError):
        METHODS["ald"].make_config({"step_rule": "bogus"})


def test_dps_per_channel_zeta_weighs_only_observed_channels():
    """A per-channel zeta (as diffusion_pde's zeta_obs): the weight of an unobserved channel is
    irrelevant, so [z, anything] on a channel-0 observation equals the scalar z."""
    from models.denoiser import Denoiser
    from operators.spec import build_operator

    class White(Denoiser):  # exact denoiser of a standard normal prior
        sigma_min, sigma_max, sigma_data, shape = 0.002, 80.0, 1.0, (2, 8, 8)

        def forward(self, x, sigma):
            return x / (1 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2)

    den = White()
    op = build_operator({"kind": "sparse_points", "points": [[0, 1, 2], [0, 5, 6], [0, 3, 3]]}, (2, 8, 8))
    y = torch.tensor([[0.5, -0.3, 0.2]], dtype=torch.float64)
    sig = get_sigmas("vp_linear", 20, den.sigma_min, den.sigma_max)

    def run(zeta):
        cfg = METHODS["dps"].make_config({"steps": 20, "zeta": zeta})
        gen = SplitGenerator([(torch.Generator().manual_seed(0), 1)])
        return METHODS["dps"].sampler(den, op, y.clone(), sig, config=cfg, generator=gen)

    torch.testing.assert_close(run([0.7, 123.0]), run(0.7))
    assert not torch.allclose(run([0.7, 0.0]), run([0.2, 0.0]))
    with pytest.raises(ValueError):
        METHODS["dps"].make_config({"zeta": [1.0, -1.0]})


def test_fast_without_the_kalman_step_takes_no_backprop(setup):
    """cg_iters 0: one network call per step and no backward pass; the closed-form proximal
    step alone still brings the samples to the data. A PDE term (no closed form) is refused."""
    from guidance.samplers import FastConfig, sample_fast

    model, op, y = setup
    fast0 = {"steps": 20, "cg_iters": 0, "lam": 1.0}  # (grf-32's card sets lam 1e-6: no proximal step)
    r = solve(model, op, y, noise_sigma=0.05, method="fast", params=fast0, num_samples=3, seed=7)
    assert r.nfe == 20 and r.metrics["data_residual"] < 0.3
    prior = model.denoiser.sample_prior(3, torch.Generator().manual_seed(1)).float().numpy()
    assert rel_residual(op, y, r.samples).max() < 0.3 * rel_residual(op, y, prior).min()

    def no_graph(t):
        raise AssertionError("a tensor was saved for a backward pass")

    with torch.autograd.graph.saved_tensors_hooks(no_graph, lambda t: t):
        solve(model, op, y, noise_sigma=0.05, method="fast", params={**fast0, "steps": 3})
    with pytest.raises(ValueError, match="cg_iters: 0 leaves"):
        sample_fast(model.denoiser, op, y[None], get_sigmas("karras", 3, 0.01, 10.0),
                    config=FastConfig(steps=3, cg_iters=0, zeta_pde=1.0), generator=torch.Generator(), pde=object())
