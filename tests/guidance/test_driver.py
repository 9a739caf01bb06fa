"""The sampler driver: one item is ``solve``; items batched together get what they get alone."""
import numpy as np
import pytest
import torch

from guidance.core import SplitGenerator
from guidance.driver import BatchItem, network_problem, sample_batch
from guidance.registry import METHODS
from guidance.solve import plan_method, solve
from models.checkpoint import builtin_models
from models.denoiser import CountingDenoiser
from operators import BatchedOperator, Unbatchable, batch_dot
from operators.blur import Blur
from operators.imaging import Inpainting

NOISE = 0.05


def mask(seed: int, frac: float = 0.3) -> torch.Tensor:
    return (torch.rand((32, 32), generator=torch.Generator().manual_seed(seed)) < frac).double()


@pytest.fixture(scope="module")
def model():
    return builtin_models()["grf-32"]


def observe(model, op, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = model.denoiser.sample_prior(1, g)
    return op.forward(x)[0] + NOISE * torch.randn(op.obs_shape, generator=g, dtype=torch.float64)


PARAMS = {"fast": {"steps": 8, "cg_iters": 2}, "dps": {"steps": 8},
          "ald": {"steps": 6, "final_corrector_steps": 3}}


@pytest.mark.parametrize("name", ["fast", "ald"])
def test_one_item_is_solve(model, name):
    op = Inpainting((1, 32, 32), mask(1))
    y = op.observed(observe(model, op, 2)[None])[0]
    plan = plan_method(model.card, model.denoiser, name, PARAMS[name])
    run = sample_batch(model, plan, [BatchItem(op, y, num_samples=3, seed=5)], noise_sigma=NOISE)
    sol = solve(model, op, y, noise_sigma=NOISE, method=name, params=PARAMS[name], num_samples=3, seed=5)
    assert run.samples[0].dtype == torch.float64 and run.samples[0].shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(run.samples[0].float().numpy(), sol.samples)
    assert run.nfe == sol.nfe == plan.config.cost().network_calls

    # and, in float64, what the sampler gives when called by hand as solve() did before the driver
    op_net, y_net, _ = network_problem(model, op, y[None])
    x = METHODS[name].sampler(CountingDenoiser(model.denoiser), op_net, y_net.expand(3, -1, -1, -1).clone(),
                              plan.sigmas, config=plan.config, noise_sigma=NOISE,
                              generator=SplitGenerator([(torch.Generator().manual_seed(5), 3)]))
    assert torch.equal(run.samples[0], op_net.to_physical(x))


@pytest.mark.parametrize("name", ["fast", "dps"])
def test_batched_items_equal_lone_runs(model, name):
    ops = [Inpainting((1, 32, 32), mask(1)), Inpainting((1, 32, 32), mask(2, 0.5))]
    items = [BatchItem(op, observe(model, op, 10 + j), num_samples=k, seed=20 + j)
             for j, (op, k) in enumerate(zip(ops, (2, 3)))]
    plan = plan_method(model.card, model.denoiser, name, PARAMS[name])
    together = sample_batch(model, plan, items, noise_sigma=NOISE)
    assert together.nfe == plan.config.steps  # one network call per step serves both items
    for item, got in zip(items, together.samples):
        alone = sample_batch(model, plan, [item], noise_sigma=NOISE)
        assert torch.equal(got, alone.samples[0])
    assert not torch.equal(together.samples[0][0], together.samples[1][0])


def test_batched_operator_applies_each_operator_to_its_rows():
    ops = [Inpainting((1, 32, 32), mask(1)), Inpainting((1, 32, 32), mask(2, 0.6))]
    bo = BatchedOperator(ops, [2, 3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((5, 1, 32, 32), generator=g, dtype=torch.float64)
    y = torch.randn((5, 1, 32, 32), generator=g, dtype=torch.float64)
    ax, aty = bo.forward(x), bo.adjoint(y)
    torch.testing.assert_close(batch_dot(ax, y), batch_dot(x, aty), rtol=1e-12, atol=1e-12)
    assert torch.equal(ax[:2], ops[0].forward(x[:2])) and torch.equal(ax[2:], ops[1].forward(x[2:]))
    assert torch.equal(aty[:2], ops[0].adjoint(y[:2])) and torch.equal(aty[2:], ops[1].adjoint(y[2:]))
    assert not torch.equal(ops[0].forward(x[2:]), ax[2:])  # the masks differ
    one = bo.forward(x[:1])  # a single row is broadcast: each operator applied, repeated over its rows
    assert torch.equal(one, torch.cat([ops[0].forward(x[:1]).expand(2, -1, -1, -1),
                                       ops[1].forward(x[:1]).expand(3, -1, -1, -1)]))


def test_batched_operator_svd():
    a, b = Inpainting((1, 32, 32), mask(1)), Inpainting((1, 32, 32), mask(2))
    assert BatchedOperator([a, a], [1, 1], shared_svd=True).svd() is not None
    with pytest.raises(Unbatchable):
        BatchedOperator([a, b], [1, 1]).svd()
    blur = Blur((1, 32, 32), gaussian={"sigma": 1.0}, boundary="reflect")  # no SVD
    assert BatchedOperator([blur, blur], [1, 1]).svd() is None
