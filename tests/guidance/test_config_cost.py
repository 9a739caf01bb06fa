"""Method configs: validation rules, and ``cost()`` equal to the network calls and backprops a run makes."""
import pytest
import torch

from guidance.core import SplitGenerator
from guidance.driver import network_problem
from guidance.registry import METHODS
from guidance.params import Cost
from models.checkpoint import builtin_models
from models.denoiser import CountingDenoiser, Denoiser
from models.schedules import get_sigmas
from operators.imaging import Inpainting


class _CountBackward(torch.autograd.Function):
    """Identity on the network's output whose backward counts one backprop through the network."""

    @staticmethod
    def forward(ctx, x0, counter):
        ctx.counter = counter
        return x0.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backprops += 1
        return grad, None


class BackpropCounter(Denoiser):
    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner = inner
        self.shape, self.sigma_min = inner.shape, inner.sigma_min
        self.sigma_max, self.sigma_data = inner.sigma_max, inner.sigma_data
        self.backprops = 0

    def forward(self, x, sigma):
        return _CountBackward.apply(self.inner(x, sigma), self)


@pytest.fixture(scope="module")
def problem():
    model = builtin_models()["grf-32"]
    g = torch.Generator().manual_seed(0)
    x = model.denoiser.sample_prior(1, g)
    op = Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < 0.3).double())
    y = op.forward(x) + 0.05 * torch.randn((1, 1, 32, 32), generator=g, dtype=torch.float64)
    return model, op, y


def measure(problem, name, params, noise_sigma=0.05, samples=2) -> tuple[Cost, object]:
    model, op, y = problem
    cfg = METHODS[name].make_config(params)
    inner = BackpropCounter(model.denoiser)
    den = CountingDenoiser(inner)
    op_net, y_net, _ = network_problem(model, op, y)
    sigmas = get_sigmas(cfg.schedule, cfg.steps, den.sigma_min, den.sigma_max)
    METHODS[name].sampler(den, op_net, y_net.expand(samples, -1, -1, -1).clone(), sigmas, config=cfg,
                          generator=SplitGenerator([(torch.Generator().manual_seed(3), samples)]),
                          noise_sigma=noise_sigma)
    return Cost(den.nfe, inner.backprops), cfg


@pytest.mark.parametrize("name, params", [
    ("fast", {"steps": 5}),
    ("fast", {"steps": 4, "cg_iters": 3}),
    ("dps", {"steps": 6}),
    ("diffusion_pde", {"steps": 5}),
    ("diffusion_pde", {"steps": 1}),
    ("ald", {"steps": 5, "corrector_steps": 2, "final_corrector_steps": 4}),  # matched level inserted
    ("ald", {"steps": 4, "corrector_steps": 0, "final_corrector_steps": 0}),
])
def test_cost_equals_measured_counts(problem, name, params):
    measured, cfg = measure(problem, name, params)
    assert cfg.cost() == measured


def test_ald_cost_is_an_upper_bound_without_a_matched_level(problem):
    measured, cfg = measure(problem, "ald", {"steps": 5, "corrector_steps": 2, "final_corrector_steps": 4},
                            noise_sigma=0.0)
    assert measured == Cost(5 * cfg.nfe_per_step(), 0)
    assert measured.network_calls < cfg.cost().network_calls


def test_nfe_per_step_as_served():
    assert {n: m.describe()["nfe_per_step"] for n, m in METHODS.items()} == {
        "fast": 1, "dps": 1, "ald": 2, "diffusion_pde": 2}
    assert METHODS["ald"].nfe_per_step(METHODS["ald"].make_config({"corrector_steps": 4})) == 5


@pytest.mark.parametrize("name, params, message", [
    ("dps", {"steps": 0}, "steps: must be >= 1, got 0"),
    ("fast", {"eta": float("nan")}, "eta: must be finite"),
    ("fast", {"steps": float("inf")}, "steps: must be an integer"),
    ("dps", {"schedule": "cosine"}, "schedule: .cosine. is not one of"),
    ("dps", {"zeta": [1.0, -1.0]}, "zeta: must be >= 0"),
    ("diffusion_pde", {"late_obs_scale": -0.1}, "late_obs_scale: must be >= 0"),
    ("fast", {"zeta_obs": -1.0}, "zeta_obs: must be >= 0"),
    ("fast", {"cg_iters": -1}, "cg_iters: must be >= 0"),
    ("fast", {"cg_iters": 51}, "cg_iters: must be <= 50"),
    ("fast", {"lam": 0}, "lam: must be > 0"),
    ("ald", {"corrector_steps": -1}, "corrector_steps: must be >= 0"),
    ("ald", {"final_corrector_steps": -1}, "final_corrector_steps: must be >= 0"),
    ("ald", {"step_rule": "bogus"}, "step_rule: .bogus. is not one of \\['snr', 'eps'\\]"),
    ("ald", {"snr": -1}, "snr: must be >= 0"),
])
def test_validation(name, params, message):
    with pytest.raises(ValueError, match=message):
        METHODS[name].make_config(params)


def test_valid_edge_values():
    METHODS["ald"].make_config({"lam": 0, "corrector_steps": 0})  # ALD: lam = 0 skips the projection
    METHODS["fast"].make_config({"cg_iters": 50, "eta": 0})
    assert METHODS["fast"].make_config({"cg_iters": 0, "steps": 7}).cost().backprops == 0  # no Kalman step
