"""bench/peers.py: our prior as a deepinv denoiser, deepinv's operators against ours, and the smoke run.

The adapter must be our ``D(x, sigma)`` and nothing else: mapped into network space and back,
sigma scaled by the card's normalization and floored at its ``sigma_min``. deepinv's forward
operators must be ours, or the side-by-side bench compares different problems.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import peers
from bench.phantom_tasks import SHAPE, TASKS, task_spec
from operators.spec import build_operator


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # a copy of checkpoints/phantom-64, as the bench loads it (a training may be exporting beside it)
    m, _ = peers.snapshot_model(tmp_path_factory.mktemp("models"))
    return m


def ours_in_deepinv_units(model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Our denoiser, computed independently of the adapter: [0, 1] -> network space -> [0, 1]."""
    lo, hi = model.card["value_range"]
    shift, scale = float(model.shift[0]), float(model.scale[0])
    x_phys = lo + (hi - lo) * x.to(torch.float64)
    s_net = torch.clamp(sigma.to(torch.float64) * (hi - lo) / scale, min=model.card["sigma_min"])
    d = model.denoiser((x_phys - shift) / scale, s_net)
    return (shift + scale * d - lo) / (hi - lo)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-7), (torch.float64, 1e-12)])
def test_adapter_is_our_denoiser_in_deepinv_units(model, dtype, tol):
    den = peers.DeepinvDenoiser(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, *SHAPE), generator=g, dtype=torch.float64).to(dtype)
    floor = model.card["sigma_min"] * float(model.scale[0])  # sigma_min in [0, 1] units (0.00105)
    for sigma in (0.0, 1e-5, floor, 0.005, 0.05, 0.3, 1.0, 40.0):
        out = den(x, sigma)
        assert out.dtype == dtype and out.shape == x.shape
        ref = ours_in_deepinv_units(model, x, torch.full((3,), sigma, dtype=torch.float64))
        err = (out.to(torch.float64) - ref).abs().max().item()
        assert err <= tol, (sigma, err)
    # per-item sigmas (deepinv may pass a [B] tensor, or a 0-d one)
    s = torch.tensor([0.0, 0.02, 2.0])
    assert (den(x, s).to(torch.float64) - ours_in_deepinv_units(model, x, s)).abs().max().item() <= tol
    assert torch.equal(den(x, torch.tensor(0.3, dtype=torch.float64)), den(x, 0.3))


def test_adapter_floors_sigma_at_the_card_minimum(model):
    den = peers.DeepinvDenoiser(model)
    x = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    floor = model.card["sigma_min"] * float(model.scale[0])
    at_floor = den(x, floor)
    assert torch.isfinite(den(x, 0.0)).all()  # DDRM's schedule ends at sigma = 0: no log(0)
    assert torch.equal(den(x, 0.0), at_floor) and torch.equal(den(x, floor / 10), at_floor)
    assert not torch.equal(den(x, 2 * floor), at_floor)
    assert den.net_sigma(0.0, 1).item() == model.card["sigma_min"]


def test_adapter_counts_calls_and_backprops(model):
    c = peers.CallCounter()
    den = peers.DeepinvDenoiser(model, c)
    x = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        den(x, 0.1)
    xg = x.clone().requires_grad_(True)
    torch.autograd.grad(den(xg, 0.1).sum(), xg)
    _, vjp = torch.func.vjp(lambda z: den(z, 0.1), x)  # how deepinv's PiGDM and moment matching call it
    vjp(torch.ones_like(x))
    vjp(torch.ones_like(x))
    assert (c.calls, c.backprops) == (3, 3)


def test_deepinv_operators_equal_ours():
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, *SHAPE), generator=g, dtype=torch.float64)
    for task in TASKS:
        ours = build_operator(task_spec(task), SHAPE)
        theirs = peers.deepinv_physics(task, dtype=torch.float64)
        y = ours.forward(x)
        err = (theirs.A(x) - y).abs().max().item()
        # Inpainting: exact; BlurFFT (the same centring) and the Hadamard block means: round-off only
        assert err <= (0.0 if "inpainting" in task else 2e-15), (task, err)
        r = torch.randn(y.shape, generator=g, dtype=torch.float64)
        assert (theirs.A_adjoint(r) - ours.adjoint(r)).abs().max().item() <= 2e-15, task
    # the centring: a unit impulse blurs into the kernel centred on it, in both
    e = torch.zeros((1, *SHAPE), dtype=torch.float64)
    e[0, 0, 20, 30] = 1
    k = torch.as_tensor(peers.gaussian_kernel(1.5, 9))
    blurred = peers.deepinv_physics("deblur", dtype=torch.float64).A(e)[0, 0]
    assert (blurred[16:25, 26:35] - k).abs().max().item() <= 2e-15


def test_block_mean_sr_has_an_exact_svd():
    sr = peers.deepinv_physics("sr4", dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn((2, *SHAPE), generator=g, dtype=torch.float64)
    y = torch.randn((2, 1, 16, 16), generator=g, dtype=torch.float64)
    assert (sr.V(sr.V_adjoint(x)) - x).abs().max().item() < 1e-13  # V orthonormal
    assert (sr.V_adjoint(sr.V(x)) - x).abs().max().item() < 1e-13
    assert torch.equal(sr.U(sr.U_adjoint(y)), y)  # U U^T = I
    assert math.isclose(float(sr.mask.max()), 0.25) and int((sr.mask > 0).sum()) == 256
    # the pseudo-inverse reproduces the block means, and A A^T = I / 16
    assert (sr.A(sr.A_dagger(y)) - y).abs().max().item() < 1e-13
    assert (sr.A(sr.A_adjoint(y)) - y / 16).abs().max().item() < 1e-15


@pytest.mark.slow
def test_peers_smoke(tmp_path):
    out, tune_out = tmp_path / "peers.json", tmp_path / "peers-tune.json"
    peers.main(["--smoke", "--out", str(out), "--tune-out", str(tune_out), "--plots", str(tmp_path)])
    data = json.loads(out.read_text())
    assert data["smoke"] and data["cases"] == 2 and set(data["tasks"]) == set(TASKS)
    tuned = json.loads(tune_out.read_text())
    assert set(tuned["best"][TASKS[0]]) == set(peers.PEER_LABELS)
    steps = peers.SMOKE_STEPS
    for task, d in data["tasks"].items():
        methods = {e["method"] for e in d["points"]}
        assert methods >= {"fast", "dps", *peers.PEER_LABELS}, (task, methods)
        for e in d["points"]:
            assert len(e["psnr"]) == 2 and np.isfinite(e["psnr"]).all() and np.isfinite(e["ssim"]).all(), e
            assert e["s_per_image"] > 0
            # DPS-like solvers (DDPM solver from t = 1 to 0) call the network steps - 1 times
            calls = steps - 1 if e["method"] in ("dinv_dps", "dinv_pigdm", "dinv_mm") else steps
            assert e["network_calls"] == calls, e
            if e["method"] in ("dinv_diffpir", "dinv_ddrm"):
                assert e["backprops"] == 0
            elif e["method"] == "fast":
                assert e["backprops"] == steps * e["params"]["cg_iters"]
            elif e["method"] in ("dps", "dinv_dps", "dinv_pigdm"):
                assert e["backprops"] == calls
    assert (tmp_path / f"peers-{TASKS[0]}.png").stat().st_size > 0  # a smoke run draws one plot
    text = peers.report(data, None)
    assert all(f"### {t}" in text for t in TASKS) and "| peer point |" in text
