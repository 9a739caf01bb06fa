"""EDM training: tiny runs export loadable checkpoints, resume exactly, and learn."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint
from models.train import add_train_arguments, run_train

pytestmark = pytest.mark.slow  # trains models

TINY = ["--threads", "1", "--resolution", "16", "--base-channels", "8", "--channel-mult", "1,2", "--batch", "4",
        "--num-examples", "12", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # runs use one thread (fast on a loaded machine); put it back
    yield
    torch.set_num_threads(n)


def _run(tmp_path, *extra, out="ck/tiny", runs="runs"):
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        [*TINY, "--out", str(tmp_path / out), "--runs-dir", str(tmp_path / runs), *extra])
    return run_train(args)


def _tensors(folder, name):
    return load_file(str(folder / name))


def _same(a: dict, b: dict, tol: float = 0.0) -> bool:
    assert a.keys() == b.keys()
    return all(torch.allclose(a[k].double(), b[k].double(), atol=tol, rtol=0) if tol else torch.equal(a[k], b[k])
               for k in a)


def test_tiny_darcy_run_writes_loadable_checkpoint(tmp_path):
    ck = _run(tmp_path, "--data", "darcy", "--steps", "3", "--save-every", "2")
    m = load_checkpoint(ck)
    c = m.card
    assert c["id"] == "tiny" and c["kind"] == "pde" and c["shape"] == [2, 16, 16] and c["channels"] == ["a", "u"]
    assert c["architecture"] == {"name": "unet", "args": {"in_channels": 2, "out_channels": 2, "base": 8,
                                                          "channel_mult": [1, 2], "blocks_per_level": 1,
                                                          "attention": True}}
    assert c["parameterization"] == {"kind": "edm", "sigma_data": 0.5}
    assert (c["sigma_min"], c["sigma_max"]) == (0.002, 80.0)
    assert c["normalization"]["shift"][0] == 7.5 and c["normalization"]["scale"][0] == 9.0
    assert c["normalization"]["scale"][1] > 0
    assert c["pde"]["kind"] == "darcy" and c["pde"]["f"] == 1.0
    assert c["pde"]["grid"] == {"n": 16, "h": 1 / 15, "domain": [0, 1]}
    assert c["value_range"] == {"a": [3.0, 12.0]} and c["methods"] == [{"name": "fast", "steps": 50}]
    assert c["description"]
    t = c["training"]
    for key in ("data", "data_seed", "num_examples", "steps", "batch", "lr", "wall_time_s", "hardware",
                "final_loss", "started", "updated"):
        assert key in t, key
    assert t["steps"] == 3 and t["num_examples"] == 12 and t["data"] == "darcy"
    # normalized training data: u channel std 0.5 in network space
    data = np.load(tmp_path / "runs" / "tiny" / "data.npy")
    u_net = (data[:, 1] - c["normalization"]["shift"][1]) / c["normalization"]["scale"][1]
    assert abs(u_net.std() - 0.5) < 1e-3 and abs(u_net.mean()) < 1e-3
    x = torch.randn(2, 2, 16, 16)
    assert m.denoiser(x, 1.0).shape == x.shape
    # the resumable state: float32 Adam moments, JSON state
    r = _tensors(ck, "resume.safetensors")
    assert any(k.startswith("adam.") and k.endswith("exp_avg_sq") for k in r)
    assert all(v.dtype in (torch.float32, torch.uint8) for v in r.values())
    assert json.loads((tmp_path / "runs" / "tiny" / "state.json").read_text())["step"] == 3
    # a second fresh run into the same folder is refused unless resuming or overwriting
    with pytest.raises(SystemExit):
        _run(tmp_path, "--data", "darcy", "--steps", "3")


def test_resume_is_exact(tmp_path):
    common = ["--data", "phantom", "--seed", "3", "--warmup", "2", "--save-every", "2"]
    full = _run(tmp_path, *common, "--steps", "6", out="full/ph", runs="runs_full")
    # interrupted after 3 steps, resumed from runs/ to 6
    part = _run(tmp_path, *common, "--steps", "3", out="part/ph", runs="runs_part")
    card = json.loads((part / "card.json").read_text())
    card["methods"], card["validation"] = [{"name": "dps"}], {"ok": True}
    (part / "card.json").write_text(json.dumps(card))
    _run(tmp_path, *common, "--steps", "6", "--resume", out="part/ph", runs="runs_part")
    for name in ("weights.safetensors", "resume.safetensors"):
        assert _same(_tensors(full, name), _tensors(part, name)), name
    card = json.loads((part / "card.json").read_text())
    assert card["methods"] == [{"name": "dps"}] and card["validation"] == {"ok": True}
    assert card["training"]["steps"] == 6
    s_full = json.loads((tmp_path / "runs_full" / "ph" / "state.json").read_text())
    s_part = json.loads((tmp_path / "runs_part" / "ph" / "state.json").read_text())
    assert s_full["loss_ema"] == s_part["loss_ema"] and s_full["history"] == s_part["history"]
    # runs/ lost (a session ended): resume from checkpoints/<id>/resume.safetensors alone
    lost = _run(tmp_path, *common, "--steps", "3", out="lost/ph", runs="runs_lost")
    shutil.rmtree(tmp_path / "runs_lost")
    _run(tmp_path, *common, "--steps", "6", "--resume", out="lost/ph", runs="runs_lost")
    assert _same(_tensors(full, "resume.safetensors"), _tensors(lost, "resume.safetensors"))


def test_time_limit_stops_and_saves(tmp_path):
    ck = _run(tmp_path, "--data", "phantom", "--steps", "1000", "--time-limit-min", "1e-6")
    card = json.loads((ck / "card.json").read_text())
    assert card["kind"] == "image" and card["value_range"] == [0.0, 1.0] and card["pde"] is None
    assert 1 <= card["training"]["steps"] < 1000


def test_loss_decreases_on_learnable_data(tmp_path):
    # two fixed smooth patterns and their negatives: the optimal denoiser is easy to learn
    t = np.linspace(0, 2 * np.pi, 16)
    p1 = np.sin(t)[:, None] * np.cos(t)[None, :]
    p2 = np.cos(2 * t)[:, None] * np.ones(16)[None, :]
    data = np.stack([p1, -p1, p2, -p2] * 4)[:, None].astype(np.float32)
    folder = tmp_path / "mine"
    folder.mkdir()
    np.save(folder / "x.npy", data)
    _run(tmp_path, "--data", str(folder), "--steps", "60", "--batch", "16", "--lr", "2e-3", "--warmup", "5",
         "--save-every", "0", out="ck/mine")
    card = json.loads((tmp_path / "ck" / "mine" / "card.json").read_text())
    assert card["kind"] == "image" and card["shape"] == [1, 16, 16] and card["training"]["num_examples"] == 16
    hist = np.array(json.loads((tmp_path / "runs" / "mine" / "state.json").read_text())["history"])
    assert len(hist) == 60
    first, last = hist[:15, 1].mean(), hist[-15:, 1].mean()
    assert last < 0.6 * first, (first, last)


def test_resume_from_bare_weights(tmp_path):
    ck = _run(tmp_path, "--data", "phantom", "--steps", "2", "--no-attention", out="ck/bare")
    shutil.rmtree(tmp_path / "runs")
    (ck / "resume.safetensors").unlink()
    ema = _tensors(ck, "weights.safetensors")
    _run(tmp_path, "--data", "phantom", "--steps", "3", "--resume", "--save-every", "0", out="ck/bare")
    card = json.loads((ck / "card.json").read_text())
    assert card["training"]["steps"] == 3 and card["architecture"]["args"]["attention"] is False
    model = {k[6:]: v for k, v in _tensors(ck, "resume.safetensors").items() if k.startswith("model.")}
    assert model.keys() == ema.keys()  # one fresh step away from the old EMA weights
    assert max(float((model[k] - ema[k]).abs().max()) for k in ema) < 1e-2


def _run_folder(tmp_path, *extra, out):
    """A tiny run on a folder, as `reconserve train` below gets it (no --resolution, --num-examples)."""
    tiny = ["--threads", "1", "--base-channels", "8", "--channel-mult", "1,2", "--batch", "2", "--log-every", "1"]
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        [*tiny, "--out", str(tmp_path / out), "--runs-dir", str(tmp_path / "runs"), *extra])
    return run_train(args)


def _pngs(folder, shapes, seed=0):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("rgb", [True, False])
def test_folder_of_pngs_is_resized_and_carded(tmp_path, rgb):
    """`reconserve train --data FOLDER --resolution 32` on 128 x 128 PNGs: a 32 x 32 model whose card says
    what it is (value range, channels, a default method) and serves."""
    from service.cli import main as cli

    c = 3 if rgb else 1
    shape = (128, 128, 3) if rgb else (128, 128)
    folder = _pngs(tmp_path / "lab", [shape] * 5 + [(160, 128, 3) if rgb else (128, 192)])  # one not square
    rc = cli(["train", "--data", str(folder), "--resolution", "32", "--steps", "2", "--batch", "2",
              "--base-channels", "8", "--channel-mult", "1,2", "--threads", "1", "--save-every", "0",
              "--out", str(tmp_path / "ck" / "lab-32"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    ck = tmp_path / "ck" / "lab-32"
    card = json.loads((ck / "card.json").read_text())
    assert card["shape"] == [c, 32, 32] and card["kind"] == "image" and card["pde"] is None
    assert card["channels"] == (["r", "g", "b"] if rgb else ["gray"])
    assert card["value_range"] == [0.0, 1.0]
    assert card["methods"] == [{"name": "fast", "steps": 50}]
    assert card["training"]["num_examples"] == 6 and card["training"]["config"]["resize"] is True
    assert "centred square crop" in card["training"]["preprocessing"] and "32x32" in card["description"]
    m = load_checkpoint(ck)
    assert m.denoiser(torch.randn(1, c, 32, 32), 1.0).shape == (1, c, 32, 32)
    # resuming keeps the crop-and-resize (structural), a different resolution is refused
    with pytest.raises(SystemExit, match="resolution"):
        _run_folder(tmp_path, "--data", str(folder), "--resolution", "16", "--steps", "3", "--resume", out="ck/lab-32")
    _run_folder(tmp_path, "--data", str(folder), "--steps", "3", "--resume", "--batch", "2", "--save-every", "0",
                out="ck/lab-32")
    assert json.loads((ck / "card.json").read_text())["shape"] == [c, 32, 32]


def test_folder_without_resolution_keeps_its_size(tmp_path):
    folder = _pngs(tmp_path / "lab", [(16, 24)] * 3)
    ck = _run_folder(tmp_path, "--data", str(folder), "--steps", "1", "--save-every", "0", out="ck/native")
    card = json.loads((ck / "card.json").read_text())
    assert card["shape"] == [1, 16, 24] and card["channels"] == ["gray"] and card["value_range"] == [0.0, 1.0]
    assert card["training"]["preprocessing"] == "none: native size"


def test_flow_objective_trains_resumes_and_serves(tmp_path):
    common = ["--data", "phantom", "--objective", "flow", "--seed", "2", "--warmup", "2", "--save-every", "2"]
    full = _run(tmp_path, *common, "--steps", "4", out="full/fl", runs="runs_full")
    part = _run(tmp_path, *common, "--steps", "2", out="part/fl", runs="runs_part")
    with pytest.raises(SystemExit):  # the objective is structural: a run cannot switch it
        _run(tmp_path, "--data", "phantom", "--objective", "edm", "--steps", "4", "--resume", out="part/fl",
             runs="runs_part")
    _run(tmp_path, *common[:2], "--steps", "4", "--resume", out="part/fl", runs="runs_part")  # kept from the state
    assert _same(_tensors(full, "weights.safetensors"), _tensors(part, "weights.safetensors"))
    m = load_checkpoint(full)
    assert m.card["parameterization"]["kind"] == "flow" and "flow matching" in m.card["training"]["loss"]
    from models.denoiser import FlowDenoiser
    assert isinstance(m.denoiser, FlowDenoiser)
    x = torch.randn(2, 1, 16, 16)
    assert torch.isfinite(m.denoiser(x, torch.tensor([0.01, 50.0]))).all()


def test_flow_loss_is_smallest_at_the_exact_velocity():
    # x0 ~ N(0, sd^2 I): the exact velocity E[z - x0 | x_t] is linear in x_t; perturbing it costs loss
    from models.trainer import flow_loss
    from models.denoiser import FlowDenoiser
    sd = 0.5

    class Exact(torch.nn.Module):
        def __init__(self, bias=0.0):
            super().__init__()
            self.bias = bias

        def forward(self, x_t, c_noise):
            s = torch.exp(4 * c_noise.double())
            t = (s / (1 + s)).view(-1, 1, 1, 1)
            var = (1 - t) ** 2 * sd ** 2 + t ** 2
            return ((t - (1 - t) * sd ** 2) / var * x_t + self.bias).to(x_t.dtype)

    x = sd * torch.randn(4096, 1, 4, 4, dtype=torch.float64)
    losses = [float(flow_loss(FlowDenoiser(Exact(b), (1, 4, 4)), x, torch.Generator().manual_seed(0)))
              for b in (0.0, 0.05, -0.05)]
    assert losses[0] < min(losses[1:])


def test_cli_arguments_parse_without_torch_and_all_have_help():
    """``reconserve train --help`` / ``data --help`` read these before torch is imported: their module
    imports neither torch nor numpy, and every option says what it does."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import argparse, sys\n"
            "from models.cli_args import add_data_arguments, add_train_arguments\n"
            "missing = []\n"
            "for add in (add_train_arguments, add_data_arguments):\n"
            "    p = add(argparse.ArgumentParser())\n"
            "    missing += [a.dest for a in p._actions if not a.help]\n"
            "print(missing, sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[] []", p.stdout
