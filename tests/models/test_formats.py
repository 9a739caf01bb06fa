"""Outside checkpoints in their genuine formats -> `reconserve import` -> load_models -> HTTP reconstruct.

Random weights (nothing can be downloaded), 3 x 32 x 32 images, tiny networks:
* diffusers: ``UNet2DModel(...).save_pretrained`` + ``DDPMScheduler(...).save_pretrained``, as a flat
  UNet folder and as a pipeline folder (``unet/``, ``scheduler/``);
* guided-diffusion/ADM: a ``torch.save``d state dict with guided-diffusion's parameter names (the
  names of deepinv's ``DiffUNet``, checked below) and DPS-style ``model_config.yaml`` settings.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.adapters import ADMUNet, adm_settings, infer_adm_settings
from models.checkpoint import CheckpointError, load_checkpoint, load_models
from models.formats import FORMATS, PickledCheckpointError, detect_format, import_model
from service.cli import main as cli

pytest.importorskip("deepinv")

#: DPS's configs/model_config.yaml layout, at a tiny size (2 levels, 32 channels, attention at 16x16)
ADM_YAML = """\
image_size: 32
num_channels: 32
num_res_blocks: 1
channel_mult: "1,2"
learn_sigma: True
class_cond: False
use_checkpoint: False
attention_resolutions: 16
num_heads: 4
num_head_channels: 32
num_heads_upsample: -1
use_scale_shift_norm: True
dropout: 0.0
resblock_updown: True
use_fp16: False
use_new_attention_order: False
model_path: ./models/tiny.pt
"""
#: DPS's configs/diffusion_config.yaml
DIFFUSION_YAML = """\
sampler: ddpm
steps: 1000
noise_schedule: linear
model_var_type: learned_range
dynamic_threshold: False
clip_denoised: True
rescale_timesteps: False
timestep_respacing: 1000
"""

RNG = np.random.default_rng(0)
MASK = (RNG.random((32, 32)) < 0.5).astype(np.float64)
OBS = RNG.random((3, 32, 32))


def _npy(a) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return {"npy": base64.b64encode(buf.getvalue()).decode()}


def _decode(enc) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(enc["npy"])), allow_pickle=False)


def _perturb_zeros(net: torch.nn.Module, seed: int = 0) -> None:
    """guided-diffusion/diffusers zero-initialize output convs: a random model would predict 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# ----------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The checkpoints as their authors' code writes them."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)
    _perturb_zeros(unet)
    unet.save_pretrained(root / "flat")  # a UNet2DModel folder with its scheduler beside it
    diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2").save_pretrained(
        root / "flat")
    unet.save_pretrained(root / "pipe" / "unet")  # a pipeline folder
    diffusers.DDPMScheduler().save_pretrained(root / "pipe" / "scheduler")
    (root / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}))

    (root / "model_config.yaml").write_text(ADM_YAML)
    (root / "diffusion_config.yaml").write_text(DIFFUSION_YAML)
    import yaml

    args, _, _ = adm_settings(yaml.safe_load(ADM_YAML))
    adm = ADMUNet(**args)
    _perturb_zeros(adm, 1)
    torch.save({"module." + k: v for k, v in adm.state_dict().items()}, root / "tiny.pt")  # DataParallel-style
    return {"root": root, "unet": unet.eval(), "adm": adm.eval()}


def _import(*argv) -> int:
    return cli(["import", *map(str, argv)])


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    """The three sources imported with the CLI into one models folder."""
    src = sources["root"]
    out = tmp_path_factory.mktemp("models")
    assert _import("diffusers", src / "flat", "--out", out / "diff-flat") == 0
    assert _import("diffusers", src / "pipe", "--out", out / "pipe", "--id", "diff-pipe") == 0
    assert _import("adm", src / "tiny.pt", "--out", out / "adm-tiny", "--config", src / "model_config.yaml",
                   "--config", src / "diffusion_config.yaml") == 0
    return out


# ----------------------------------------------------------------------------- the registry
def test_registry_and_detection(sources, tmp_path):
    src = sources["root"]
    assert set(FORMATS) == {"reconserve", "adm", "diffusers"}
    for f in FORMATS.values():
        assert callable(f.detect) and callable(f.import_) and callable(f.load)
    assert detect_format(src / "flat") == "diffusers" and detect_format(src / "pipe") == "diffusers"
    assert detect_format(src / "tiny.pt") == "adm"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sources["adm"].state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    assert detect_format(tmp_path / "tiny.safetensors") == "adm"
    out = import_model("auto", tmp_path / "tiny.safetensors", tmp_path / "m" / "st", config=src / "model_config.yaml")
    assert load_checkpoint(out).card["architecture"]["name"] == "adm"
    assert detect_format(Path(__file__).resolve().parents[2] / "checkpoints" / "phantom-64") == "reconserve"


def test_cards_of_imported_models(imported, sources):
    models = load_models(imported)
    assert {"diff-flat", "diff-pipe", "adm-tiny"} <= set(models)
    for mid, m in models.items():
        if mid == "grf-32":
            continue
        c = m.card
        assert c["kind"] == "image" and c["shape"] == [3, 32, 32] and c["channels"] == ["r", "g", "b"]
        assert c["value_range"] == [0.0, 1.0]
        assert c["normalization"]["shift"] == [0.5] * 3 and c["normalization"]["scale"] == [0.5] * 3
        assert c["methods"] == [{"name": "fast", "steps": 50}]
        assert c["parameterization"]["kind"] == "vp" and c["pde"] is None
        src = c["training"]["source"]
        assert len(src["sha256"]) == 64 and src["format"] in ("adm", "diffusers")
        # sigma range from the betas: sigma = sqrt((1 - abar) / abar) at the first and last timestep
        assert m.denoiser.sigma_min == pytest.approx(c["sigma_min"])
        assert m.denoiser.sigma_max == pytest.approx(c["sigma_max"])
        assert (imported / {"diff-pipe": "pipe"}.get(mid, mid) / "weights.safetensors").is_file()
    flat, pipe, adm = models["diff-flat"].card, models["diff-pipe"].card, models["adm-tiny"].card
    assert flat["architecture"]["name"] == "diffusers" and flat["parameterization"]["prediction"] == "v"
    assert flat["parameterization"]["schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    assert pipe["parameterization"]["prediction"] == "eps" and pipe["id"] == "diff-pipe"
    # DDPM linear betas 1e-4 .. 0.02: sigma_min = sqrt(1e-4 / (1 - 1e-4)), sigma_max ~ 157
    assert pipe["sigma_min"] == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-4)
    assert 150 < pipe["sigma_max"] < 165
    assert adm["architecture"]["name"] == "adm" and adm["parameterization"]["prediction"] == "eps"
    assert adm["architecture"]["args"]["attention_resolutions"] == [2]  # 16x16 of 32 = downsampling rate 2
    assert adm["training"]["source"]["settings"]["noise_schedule"] == "linear"
    assert adm["training"]["source"]["config"]["model_path"] == "./models/tiny.pt"
    assert adm["sigma_min"] == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-9)


def test_loaded_models_equal_the_originals(imported, sources):
    """The served denoiser is the authors' network under the card's schedule (no pickle, no network)."""
    from models.adapters import diffusers_denoiser

    models = load_models(imported)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sched = json.loads((sources["root"] / "flat" / "scheduler_config.json").read_text())
    ref = diffusers_denoiser(sources["unet"], sched)
    with torch.no_grad():
        assert torch.equal(models["diff-flat"].denoiser(x, 2.5), ref(x, 2.5))
        # ADM: D(x, sigma) = x - sigma * eps(x_t, t) with x_t = x / sqrt(1 + sigma^2), at a trained timestep
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        t = 300
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        eps = sources["adm"](x / (1 + sigma ** 2) ** 0.5, torch.full((2,), float(t)))[:, :3]
        d = models["adm-tiny"].denoiser(x, sigma)
        assert eps.abs().max() > 1e-3
        torch.testing.assert_close(d, x - sigma * eps, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_each_format_serves_over_http(imported, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    models = load_models(imported)
    app = create_app(Settings(data_dir=tmp_path / "var", batch_window_ms=0), models)
    with TestClient(app) as c:
        listed = {m["id"] for m in c.get("/v1/models").json()["models"]}
        assert {"diff-flat", "diff-pipe", "adm-tiny"} <= listed
        for mid in ("diff-flat", "diff-pipe", "adm-tiny"):
            body = {"model": mid, "operator": {"kind": "inpainting", "mask": _npy(MASK)},
                    "observation": _npy(OBS * MASK), "noise_sigma": 0.05, "method": {"name": "fast", "steps": 3},
                    "num_samples": 2, "seed": 1, "return": ["mean", "std", "samples"]}
            r = c.post("/v1/reconstruct", json=body)
            assert r.status_code == 200, (mid, r.text[:500])
            res = r.json()
            assert res["model"] == mid and res["nfe"] == 3
            assert res["mean"]["shape"] == [3, 32, 32] and res["std"]["shape"] == [3, 32, 32]
            assert res["samples"]["shape"] == [2, 3, 32, 32]
            assert np.isfinite(_decode(res["samples"])).all()
            # the card's default method applies when none is named
            r = c.post("/v1/reconstruct", json={**body, "method": None, "num_samples": 1})
            assert r.status_code == 200 and r.json()["method"]["steps"] == 50, r.text[:300]


@pytest.mark.slow
def test_real_server_serves_an_imported_folder(imported):
    """`reconserve serve --models DIR` (RECONSERVE_MODELS_DIR) in its own process, one request."""
    from tests.helpers.server import start_server, stop_server

    from service.client import Client

    proc, url = start_server({"RECONSERVE_MODELS_DIR": str(imported)})
    try:
        with Client(url, timeout=120) as client:
            assert {"adm-tiny", "diff-flat", "diff-pipe"} <= {m["id"] for m in client.models()}
            res = client.reconstruct("adm-tiny", {"kind": "inpainting", "mask": MASK}, OBS * MASK,
                                     noise_sigma=0.05, method={"name": "fast", "steps": 2}, num_samples=1, seed=0)
        assert res["mean"].shape == (3, 32, 32) and np.isfinite(res["mean"]).all()
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------- ADM specifics
def test_adm_unet_is_guided_diffusions(tmp_path):
    """With DPS's FFHQ settings ADMUNet is deepinv's DiffUNet (guided-diffusion's names), weight for weight."""
    from deepinv.models import DiffUNet

    torch.manual_seed(0)
    ref = DiffUNet(pretrained=None).eval()
    _perturb_zeros(ref)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("sqrt_")}
    args, settings, inferred = adm_settings(None, sd)  # everything read off the weights
    assert settings["image_size"] == 256 and settings["channel_mult"] == "1,1,2,2,4,4"
    assert settings["attention_resolutions"] == "16" and settings["num_res_blocks"] == 1
    assert settings["learn_sigma"] and settings["resblock_updown"] and settings["use_scale_shift_norm"]
    assert "image_size" in inferred and "num_head_channels" in inferred
    net = ADMUNet(**args).eval()
    net.load_state_dict(sd, strict=True)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([421.5])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), ref.forward_diffusion(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("updown", [True, False])
def test_adm_settings_read_off_the_weights(updown):
    cfg = {"image_size": 32, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,2,2",
           "attention_resolutions": "16,8", "learn_sigma": not updown, "num_head_channels": 32,
           "resblock_updown": updown, "use_scale_shift_norm": not updown}
    args, _, _ = adm_settings(cfg)
    sd = ADMUNet(**args).state_dict()
    found = infer_adm_settings(sd)
    assert found["num_res_blocks"] == 2 and found["channel_mult"] == "1,2,2" and found["attention_ds"] == [2, 4]
    assert found["resblock_updown"] is updown and found["use_scale_shift_norm"] is (not updown)
    assert found["learn_sigma"] is (not updown) and found["num_channels"] == 32
    # only what the weights cannot hold is needed: the image size and the attention heads
    assert adm_settings({"image_size": 32, "num_head_channels": 32}, sd)[0] == args


def test_adm_import_with_a_json_config_and_mismatches(sources, tmp_path, capsys):
    src = sources["root"]
    (tmp_path / "size.json").write_text(json.dumps({"image_size": 32, "num_head_channels": 32}))
    assert _import("adm", src / "tiny.pt", "--out", tmp_path / "m" / "a", "--config", tmp_path / "size.json") == 0
    out = capsys.readouterr().out
    assert "serve it: reconserve serve --models" in out and "use_new_attention_order" in out
    card = json.loads((tmp_path / "m" / "a" / "card.json").read_text())
    assert card["training"]["source"]["settings"]["attention_resolutions"] == "16"
    # a second import into the same folder is refused, --overwrite replaces
    assert _import("adm", src / "tiny.pt", "--out", tmp_path / "m" / "a", "--config", tmp_path / "size.json") == 2
    assert "--overwrite" in capsys.readouterr().err
    # settings that contradict the weights: a clear message, exit code 2, no traceback
    (tmp_path / "bad.json").write_text(json.dumps({"image_size": 32, "num_res_blocks": 2, "num_head_channels": 32}))
    assert _import("adm", src / "tiny.pt", "--out", tmp_path / "m" / "b", "--config", tmp_path / "bad.json") == 2
    assert "num_res_blocks" in capsys.readouterr().err
    # the size is not in the weights and 2 levels name none
    assert _import("adm", src / "tiny.pt", "--out", tmp_path / "m" / "c") == 2
    assert "image_size" in capsys.readouterr().err
    assert not (tmp_path / "m" / "b" / "card.json").exists() and not (tmp_path / "m" / "c" / "card.json").exists()


# ----------------------------------------------------------------------------- refusals
class _Code:
    """Unpickling this runs a function (as an EDM .pkl's classes do)."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    edm = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    with open(edm, "wb") as f:
        pickle.dump({"ema": _Code(), "augment_pipe": None}, f)
    assert _import("auto", edm, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "torch.save(net.state_dict()" in err and "safetensors" in err
    assert "pickled code ran" not in err
    assert _import("adm", edm, "--out", tmp_path / "out") == 2
    assert "torch.save(net.state_dict()" in capsys.readouterr().err
    with pytest.raises(PickledCheckpointError, match="state_dict"):
        import_model("adm", edm, tmp_path / "out")
    # a .pt holding a whole module (code), not a state dict: weights_only refuses, we explain
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    assert _import("adm", tmp_path / "module.pt", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "torch.save(net.state_dict()" in err and "\x1b" not in err  # no terminal styling codes
    # a plain tensor is not a state dict either
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        import_model("adm", tmp_path / "tensor.pt", tmp_path / "out")
    assert not (tmp_path / "out" / "card.json").exists()


def test_unknown_sources_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _import("auto", tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert "not a format reconserve imports" in capsys.readouterr().err
    assert _import("diffusers", tmp_path / "nope", "--out", tmp_path / "out") == 2
    assert "no such file" in capsys.readouterr().err


def test_reconserve_folder_import_renames(tmp_path):
    src = Path(__file__).resolve().parents[2] / "checkpoints" / "phantom-64"
    if not (src / "weights.safetensors").is_file():
        pytest.skip("no phantom-64 checkpoint")
    out = import_model("reconserve", src, tmp_path / "models" / "mine", model_id="my-phantom")
    m = load_checkpoint(out)
    assert m.id == "my-phantom" and m.card["shape"] == [1, 64, 64]
    assert "my-phantom" in load_models(tmp_path / "models")
