"""RGB 256 x 256 end to end over HTTP: codecs (RGB PNG/TIFF, alpha, uint8 .npy), every imaging
operator, batching, a colour result.png with a std colour bar, the value-range guard, the misfit
metrics, and ``reconserve solve`` with an RGB PNG. The model is analytic (a standard normal prior
in network space, ``WhiteDenoiser``): no checkpoint or training needed."""
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from models.checkpoint import LoadedModel
from service.render import BAR_H, GAP, HEADER
from tests.helpers.service import MODELS, WhiteDenoiser, decode, npy_b64, wait_status

H = W = 256
RGB_CARD = {
    "id": "rgb-256", "kind": "image", "shape": [3, H, W], "channels": ["r", "g", "b"],
    "value_range": [0.0, 1.0], "pde": None, "prior": None, "training": None,
    "description": "test model: a standard normal prior in network space, x = 0.5 + 0.25 z",
    "normalization": {"shift": [0.5, 0.5, 0.5], "scale": [0.25, 0.25, 0.25]},
    "methods": [{"name": "fast", "steps": 4}], "sigma_min": 0.002, "sigma_max": 80.0,
}
RGB_MODELS = {**MODELS, "rgb-256": LoadedModel(RGB_CARD, WhiteDenoiser((3, H, W)))}
RNG = np.random.default_rng(0)
#: A smooth colour image in [0, 1]: a different gradient per channel.
_yy, _xx = np.mgrid[0:H, 0:W] / (H - 1)
IMAGE = np.stack([_xx, _yy, 0.5 + 0.4 * np.sin(6 * _xx) * np.cos(4 * _yy)])
IMAGE8 = np.round(IMAGE * 255).astype(np.uint8)  # [3, H, W]
NOISE = 0.02


def png_b64(arr_hwc: np.ndarray, mode=None) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr_hwc, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def rgb_png(chw8: np.ndarray) -> dict:
    return {"png": png_b64(np.moveaxis(chw8, 0, -1))}


def rgb_body(operator, observation, **kw):
    b = {"model": "rgb-256", "operator": operator, "observation": observation, "noise_sigma": NOISE,
         "num_samples": 2, "seed": 1, "method": {"name": "fast", "steps": 4}}
    b.update(kw)
    return b


@pytest.fixture
def rgb(make_client):
    return make_client(models=RGB_MODELS)


def _check_result(c, res, shape=(3, H, W)):
    assert res["model"] == "rgb-256"
    mean, std = decode(res["mean"]), decode(res["std"])
    assert mean.shape == shape and std.shape == shape and np.isfinite(mean).all() and (std > 0).any()
    met = res["metrics"]
    assert len(met["whitened_misfit"]) == 2 and met["observed_values"] > 0
    assert isinstance(met["misfit"], bool) and met["misfit_threshold"] >= 2.0
    return mean


# ----------------------------------------------------------------------------- every imaging operator
MASK_HW = (RNG.random((H, W)) < 0.4).astype(np.uint8)
MASK_CHW = (RNG.random((3, H, W)) < 0.4).astype(np.uint8)
POINTS = np.stack([RNG.integers(0, 3, 500), RNG.integers(0, H, 500), RNG.integers(0, W, 500)], 1)


def _operator_cases():
    sr = IMAGE.reshape(3, H // 4, 4, W // 4, 4).mean((2, 4))
    return {
        "identity": ({"kind": "identity"}, rgb_png(IMAGE8)),
        "inpainting_hw": ({"kind": "inpainting", "mask": {"png": png_b64(MASK_HW * 255)}},
                          rgb_png(IMAGE8 * MASK_HW)),
        "inpainting_chw": ({"kind": "inpainting", "mask": {"npy": npy_b64(MASK_CHW)}},
                           rgb_png(IMAGE8 * MASK_CHW)),
        "sparse_points": ({"kind": "sparse_points", "points": POINTS.tolist()},
                          IMAGE[POINTS[:, 0], POINTS[:, 1], POINTS[:, 2]].tolist()),
        "blur": ({"kind": "blur", "gaussian": {"sigma": 1.0}}, rgb_png(IMAGE8)),  # circular: Fourier prox
        "super_resolution": ({"kind": "super_resolution", "factor": 4},
                             rgb_png(np.round(sr * 255).astype(np.uint8))),
        "compressed_sensing": ({"kind": "compressed_sensing", "m": 16, "seed": 3}, None),
        "ct": ({"kind": "ct", "angles": 8}, None),
    }


#: Kinds that refuse a 3-channel model, with a clear 422 (tested below).
REFUSED_ON_RGB = {"mri"}


def test_the_cases_cover_every_registered_operator_kind():
    from operators.spec import OPERATORS
    covered = {k.split("_hw")[0].split("_chw")[0] for k in _operator_cases()} | REFUSED_ON_RGB
    assert set(OPERATORS) <= covered, sorted(set(OPERATORS) - covered)


@pytest.mark.parametrize("case", list(_operator_cases()))
def test_every_imaging_operator_on_rgb_256(rgb, case):
    op, obs = _operator_cases()[case]
    from operators.spec import OPERATORS
    if op["kind"] not in OPERATORS:
        pytest.skip(f"no operator kind {op['kind']} here")
    if obs is None:  # compressed sensing, CT: the image seen through the operator
        from operators.spec import build_operator
        A = build_operator(op, (3, H, W))
        obs = A.forward(torch.as_tensor(IMAGE)[None])[0].tolist()
    # ct: dps (fast's proximal step solves CT's ill-conditioned normal equations by CG: ~85
    # iterations per step here, minutes for a test)
    method = {"name": "dps", "steps": 3} if op["kind"] == "ct" else {"name": "fast", "steps": 4}
    r = rgb.post("/v1/reconstruct", json=rgb_body(op, obs, method=method))
    assert r.status_code == 200, r.text
    mean = _check_result(rgb, r.json())
    if case in ("identity", "inpainting_hw", "inpainting_chw"):
        # the colour survives: where observed, the mean follows each channel of the image
        obs_mask = {"identity": np.ones((3, H, W)), "inpainting_hw": np.broadcast_to(MASK_HW, (3, H, W)),
                    "inpainting_chw": MASK_CHW}[case].astype(bool)
        for k in range(3):
            err = np.abs(mean[k] - IMAGE[k])[obs_mask[k]].mean()
            assert err < 0.05, (case, k, err)


def test_mri_on_rgb_is_refused_clearly(rgb):
    mask = np.zeros((H, W))
    mask[:, :32] = 1
    r = rgb.post("/v1/reconstruct", json=rgb_body({"kind": "mri", "mask": mask.tolist()},
                                                  np.zeros((2, H, W)).tolist()))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_operator"
    assert "3 channels" in err["message"] and "1-channel" in err["message"]


# ----------------------------------------------------------------------------- codecs
def test_rgb_tiff_rgba_png_and_uint8_npy_agree_with_the_rgb_png(rgb):
    """One colour image sent five ways: the same observation, so bit-identical results."""
    hwc = np.moveaxis(IMAGE8, 0, -1)
    rgba = np.concatenate([hwc, np.full((H, W, 1), 255, np.uint8)], -1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, hwc, photometric="rgb")
    forms = {"png": rgb_png(IMAGE8), "rgba_opaque": {"png": png_b64(rgba, "RGBA")},
             "tiff": {"tiff": base64.b64encode(buf.getvalue()).decode()},
             "uint8_npy": {"npy": npy_b64(IMAGE8)}, "float_npy": {"npy": npy_b64(IMAGE8 / 255.0)}}
    op = {"kind": "inpainting", "mask": {"npy": npy_b64(MASK_HW)}}
    means = {k: decode(rgb.post("/v1/reconstruct", json=rgb_body(op, v)).json()["mean"]) for k, v in forms.items()}
    for k, m in means.items():
        np.testing.assert_array_equal(m, means["png"], err_msg=k)


def test_translucent_rgba_is_refused_and_gray_for_rgb_is_explained(rgb):
    rgba = np.concatenate([np.moveaxis(IMAGE8, 0, -1), np.full((H, W, 1), 255, np.uint8)], -1)
    rgba[:10, :10, 3] = 0
    r = rgb.post("/v1/reconstruct", json=rgb_body({"kind": "identity"}, {"png": png_b64(rgba, "RGBA")}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_array"
    assert "100 transparent" in r.json()["error"]["message"] and "opaque" in r.json()["error"]["message"]
    r = rgb.post("/v1/reconstruct", json=rgb_body({"kind": "identity"}, {"png": png_b64(IMAGE8[0])}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "shape_mismatch"
    assert "send an RGB image" in r.json()["error"]["message"]


def test_uint8_npy_is_scaled_for_image_models_only(rgb):
    """Image model: a uint8 .npy reads like a PNG (above). PDE model (toy-darcy-16): integers are
    physical units, taken as is: a uint8 and a float64 .npy of the same values agree."""
    pts = [[0, 3, 3], [0, 8, 8], [1, 5, 5]]
    vals = np.array([3, 12, 0], dtype=np.uint8)
    out = []
    for arr in (vals, vals.astype(np.float64)):
        b = {"model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": pts},
             "observation": {"npy": npy_b64(arr)}, "noise_sigma": 0.01, "num_samples": 1}
        r = rgb.post("/v1/reconstruct", json=b)
        assert r.status_code == 200, r.text
        out.append(decode(r.json()["mean"]))
    np.testing.assert_array_equal(out[0], out[1])
    assert abs(out[0][0, 8, 8] - 12) < 1.0  # not 12/255


def test_two_dimensional_npy_for_a_one_channel_model(rgb):
    obs = RNG.standard_normal((32, 32))
    b = {"model": "grf-32", "operator": {"kind": "identity"}, "observation": {"npy": npy_b64(obs)},
         "noise_sigma": 0.1, "method": {"name": "fast", "steps": 4}}
    r = rgb.post("/v1/reconstruct", json=b)
    assert r.status_code == 200, r.text
    b["observation"] = {"npy": npy_b64(obs[None])}
    np.testing.assert_array_equal(decode(r.json()["mean"]),
                                  decode(rgb.post("/v1/reconstruct", json=b).json()["mean"]))


# ----------------------------------------------------------------------------- value range
def test_observations_grossly_outside_the_value_range_are_refused(rgb):
    op = {"kind": "inpainting", "mask": {"npy": npy_b64(MASK_HW)}}
    r = rgb.post("/v1/reconstruct", json=rgb_body(op, {"npy": npy_b64(IMAGE8.astype(np.float64))}))  # 0..255
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "out_of_range" and "[0, 1]" in err["message"] and "PNG" in err["message"]
    # a little outside (noise, a slightly over-exposed image) is accepted; unobserved pixels do not count
    ok = IMAGE * 1.5 - 0.25
    ok[:, MASK_HW == 0] = 1e6
    assert rgb.post("/v1/reconstruct", json=rgb_body(op, {"npy": npy_b64(ok)})).status_code == 200
    # observations that are not pixel averages (compressed sensing) are not range-checked
    big = (1e3 * RNG.standard_normal(16)).tolist()
    assert rgb.post("/v1/reconstruct", json=rgb_body({"kind": "compressed_sensing", "m": 16},
                                                     big)).status_code == 200


def test_value_range_per_channel_on_a_pde_model(rgb):
    """toy-darcy-16's card bounds a in [3, 12] only: a = 30 is refused, any u is accepted."""
    def post(points, values):
        return rgb.post("/v1/reconstruct", json={
            "model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": points},
            "observation": values, "noise_sigma": 0.01})
    assert post([[0, 4, 4], [1, 5, 5]], [30.0, 0.0]).json()["error"]["code"] == "out_of_range"
    assert post([[0, 4, 4], [1, 5, 5]], [20.0, 1.0]).status_code == 200  # a: within width + 6 sigma; u: no range


# ----------------------------------------------------------------------------- batching, result.png
def test_rgb_jobs_batch_and_draw_in_colour(rgb):
    op = {"kind": "inpainting", "mask": {"npy": npy_b64(MASK_HW)}}
    bodies = [rgb_body(op, rgb_png(IMAGE8), seed=s) for s in (1, 2, 3)]
    rgb.manager.pause()
    ids = [rgb.post("/v1/jobs", json=b).json()["id"] for b in bodies]
    rgb.manager.resume()
    results = []
    for jid in ids:
        assert wait_status(rgb, jid)["status"] == "succeeded"
        results.append(rgb.get(f"/v1/jobs/{jid}/result").json())
    assert [r["batched_with"] for r in results] == [3, 3, 3]
    alone = rgb.post("/v1/reconstruct", json=bodies[1]).json()
    np.testing.assert_array_equal(decode(results[1]["mean"]), decode(alone["mean"]))

    png = rgb.get(f"/v1/jobs/{ids[0]}/result.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    im = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    top = HEADER + GAP
    mean_panel = im[top:top + H, 2 * GAP + W:2 * GAP + 2 * W]
    assert np.abs(mean_panel[..., 0] - mean_panel[..., 2]).mean() > 20  # colour, not gray
    bar = im[top + H + 2 + BAR_H // 2, 3 * GAP + 2 * W:3 * GAP + 3 * W]  # the std panel's colour bar
    assert np.abs(bar[2] - [68, 1, 84]).max() <= 20 and np.abs(bar[-3] - [253, 231, 37]).max() <= 20
    assert im.shape[0] > top + H + BAR_H + 8  # room for its labelled ends


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_solve_with_an_rgb_png(tmp_path):
    """``reconserve solve`` (local) with an RGB PNG observation on a random-weight 3 x 256 x 256
    checkpoint (the smallest U-Net)."""
    from models.checkpoint import build_network, save_checkpoint

    arch = {"name": "unet", "args": {"in_channels": 3, "out_channels": 3, "base": 8, "channel_mult": [1],
                                     "blocks_per_level": 1, "attention": False}}
    card = {**RGB_CARD, "id": "rgb-tiny", "architecture": arch, "methods": [{"name": "fast", "steps": 2}],
            "parameterization": {"kind": "edm", "sigma_data": 0.5}}
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "rgb-tiny", build_network(arch), card)
    Image.fromarray(np.moveaxis(IMAGE8, 0, -1)).save(tmp_path / "obs.png")
    np.save(tmp_path / "mask.npy", MASK_HW)
    (tmp_path / "op.json").write_text(json.dumps({"kind": "inpainting", "mask": "mask.npy"}))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "solve", "--models", str(tmp_path / "models"), "--model", "rgb-tiny",
         "--operator", str(tmp_path / "op.json"), "--observation", str(tmp_path / "obs.png"),
         "--samples", "2", "--noise-sigma", str(NOISE), "--threads", "1", "--out", str(tmp_path / "out.npz")],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert out["mean"].shape == (3, H, W) and out["samples"].shape == (2, 3, H, W)
    meta = json.loads(str(out["meta"]))
    assert meta["model"] == "rgb-tiny" and len(meta["metrics"]["whitened_misfit"]) == 2


# ----------------------------------------------------------------------------- misfit over HTTP
def test_misfit_flag_over_http_on_grf_32(rgb):
    """The worker passes noise_sigma to the metrics: on grf-32 (exact prior) an observation drawn
    from the model is not flagged and a sharp checkerboard is; without noise both are null."""
    model = MODELS["grf-32"]
    mask = (np.random.default_rng(3).random((32, 32)) < 0.25).astype(np.float64)
    x0 = model.denoiser.sample_prior(1, torch.Generator().manual_seed(5))[0].numpy()
    check = (-1.0) ** np.add.outer(np.arange(32), np.arange(32))[None]
    noise = 0.2 * np.random.default_rng(4).standard_normal((1, 32, 32))
    out = {}
    for name, x in (("prior", x0), ("checkerboard", check)):
        b = {"model": "grf-32", "operator": {"kind": "inpainting", "mask": mask.tolist()},
             "observation": {"npy": npy_b64((x + noise) * mask)}, "noise_sigma": 0.2, "num_samples": 2,
             "method": {"name": "fast"}}
        job = rgb.post("/v1/jobs", json=b).json()["id"]
        assert wait_status(rgb, job)["status"] == "succeeded"
        out[name] = rgb.get(f"/v1/jobs/{job}/result").json()["metrics"]
        assert out[name]["observed_values"] == int(mask.sum())
        b["noise_sigma"] = 0.0
        met = rgb.post("/v1/reconstruct", json=b).json()["metrics"]
        assert met["misfit"] is None and met["whitened_misfit"] is None
    assert out["prior"]["misfit"] is False and np.mean(out["prior"]["whitened_misfit"]) < 1.6
    assert out["checkerboard"]["misfit"] is True
    assert np.mean(out["checkerboard"]["whitened_misfit"]) > 3 * out["checkerboard"]["misfit_threshold"]


def test_checkpoint_cards_state_their_training_data():
    """Every shipped card says what its prior was trained on, and the data's value range is the
    range the service guards (``value_range``)."""
    from models.checkpoint import default_checkpoint_dir

    cards = sorted(default_checkpoint_dir().glob("*/card.json"))
    assert cards
    for path in cards:
        card = json.loads(path.read_text())
        data = card["data"]
        assert data["source"] and data["content"] and data["not_in_the_data"], path
        assert data["value_range"] == card["value_range"], path
        assert data["num_examples"] == card["training"]["num_examples"], path
