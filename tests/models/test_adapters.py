"""Outside-checkpoint adapters (guided-diffusion/ADM via deepinv's DiffUNet, diffusers UNet2DModel).

Random weights only (nothing can be downloaded); tiny inputs.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from models.adapters import (
    ADAPTERS, adm_alphas_cumprod, adm_denoiser, diffusers_alphas_cumprod, diffusers_denoiser, load_adm_state_dict,
    load_external,
)
from models.schedules import ddpm_linear_alphas_cumprod

pytest.importorskip("deepinv")


class _Evil:
    """Unpickling this calls a function: ``weights_only=True`` must refuse it."""

    def __reduce__(self):
        return (len, ((),))


def _sigma_at(abar: torch.Tensor, t: int) -> float:
    a = abar.double()[t]
    return float(torch.sqrt((1 - a) / a))


def _close(a, b, rtol=1e-5):
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-12)
    assert err < rtol, float(err)


# ---------------------------------------------------------------------------------- ADM ----

@pytest.fixture(scope="module")
def adm():
    torch.manual_seed(0)
    den = adm_denoiser(image_size=32)  # DiffUNet's FFHQ architecture, random weights
    with torch.no_grad():  # guided-diffusion zero-initializes output convs: eps would be 0
        for p in den.net.unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return den


def test_adm_shape_and_schedule(adm):
    assert adm.shape == (3, 32, 32) and adm.parameterization == "eps" and adm.out_channels == 3
    assert not adm.net.unet.training
    abar = ddpm_linear_alphas_cumprod(1000, 1e-4, 0.02)
    assert torch.allclose(adm.log_sigmas.exp(), torch.sqrt((1 - abar) / abar))
    assert torch.allclose(adm_alphas_cumprod(), abar)
    cos = adm_alphas_cumprod(1000, "cosine")
    assert torch.all(cos[1:] < cos[:-1]) and 0 < cos[-1] < 1e-4


def test_adm_matches_raw_eps_at_integer_timestep(adm):
    torch.manual_seed(1)
    abar = ddpm_linear_alphas_cumprod()
    t, C = 250, 3
    sigma = _sigma_at(abar, t)
    x_t = torch.randn(2, C, 32, 32)
    x = x_t * math.sqrt(1 + sigma ** 2)
    assert float(adm.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))) == t
    with torch.no_grad():
        raw = adm.net.unet.forward_diffusion(x_t, torch.full((2,), t, dtype=torch.long))
        d = adm(x, sigma)
    assert raw.shape[1] == 2 * C  # learned sigma: eps then variance
    assert raw[:, :C].abs().max() > 1e-3  # the network is not trivially zero
    _close(d, x - sigma * raw[:, :C])


def test_adm_fractional_sigma(adm):
    abar = ddpm_linear_alphas_cumprod()
    s0, s1 = _sigma_at(abar, 250), _sigma_at(abar, 251)
    sig = torch.linspace(s0, s1, 5, dtype=torch.float64)
    ts = adm.sigma_to_t(sig)
    assert ts[0] == 250 and ts[-1] == 251 and torch.all(ts[1:] > ts[:-1])
    x = torch.randn(1, 3, 32, 32) * 2
    with torch.no_grad():
        d = adm(x, float(sig[2]))
    assert torch.isfinite(d).all()


def test_adm_state_dict_round_trip(adm, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "adm.safetensors"
    save_file({k: v.contiguous() for k, v in adm.net.unet.state_dict().items()}, str(path))
    fresh = load_external("adm", path, image_size=32)
    assert fresh.shape == adm.shape and fresh.out_channels == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x, 3.0), adm(x, 3.0))
    with pytest.raises(ValueError, match="in_channels"):
        load_external("adm", path, in_channels=1, image_size=32)


def test_adm_state_dict_file_formats(tmp_path):
    w = torch.randn(4, 3, 3, 3)
    nested = {"state_dict": {"module.input_blocks.0.0.weight": w, "module.sqrt_alphas_cumprod": torch.ones(3)},
              "step": 10}
    torch.save(nested, tmp_path / "a.pt")
    sd = load_adm_state_dict(tmp_path / "a.pt")
    assert list(sd) == ["input_blocks.0.0.weight"] and torch.equal(sd["input_blocks.0.0.weight"], w)

    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):  # pickled code is refused by weights_only=True
        load_adm_state_dict(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="multiple of 32"):
        adm_denoiser(image_size=48)
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_external("nope", tmp_path)
    assert set(ADAPTERS) == {"adm", "diffusers"}


# ---------------------------------------------------------------------------- diffusers ----

@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")

TINY = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


@pytest.fixture(scope="module")
def unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY).eval()


@pytest.mark.parametrize("cfg", [
    {},
    {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": 500},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
])
def test_diffusers_alphas_cumprod_matches_scheduler(diffusers, cfg):
    ours = diffusers_alphas_cumprod(cfg)
    ref = diffusers.DDPMScheduler(**cfg).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    assert torch.equal(ours.float(), ref.float())


def test_diffusers_zero_snr_stays_finite(diffusers, unet):
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True}
    ours, ref = diffusers_alphas_cumprod(cfg), diffusers.DDPMScheduler(**cfg).alphas_cumprod.double()
    assert torch.equal(ours[:-1].float(), ref[:-1].float()) and ref[-1] == 0 and ours[-1] == 2.0 ** -24
    den = diffusers_denoiser(unet, cfg)
    assert math.isfinite(den.sigma_max) and torch.isfinite(den(torch.randn(1, 1, 16, 16), 100.0)).all()


@pytest.mark.parametrize("prediction_type,param", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_diffusers_matches_model_and_scheduler(diffusers, unet, prediction_type, param):
    cfg = {"prediction_type": prediction_type, "clip_sample": False}
    den = diffusers_denoiser(unet, cfg)
    assert den.parameterization == param and den.shape == (1, 16, 16)
    sched = diffusers.DDPMScheduler(**cfg)
    t = 250
    abar = float(sched.alphas_cumprod[t])
    sigma = _sigma_at(diffusers_alphas_cumprod(cfg), t)
    torch.manual_seed(2)
    x_t = torch.randn(2, 1, 16, 16)
    x = x_t * math.sqrt(1 + sigma ** 2)
    with torch.no_grad():
        out = unet(x_t, t).sample
        d = den(x, sigma)
        ref = sched.step(out, t, x_t).pred_original_sample
    if param == "eps":
        expected = x - sigma * out
    elif param == "v":
        expected = math.sqrt(abar) * x_t - math.sqrt(1 - abar) * out
    else:
        expected = out
    _close(d, expected)
    _close(d, ref, rtol=1e-4)  # the scheduler's own x0 (float32 arithmetic)


def test_diffusers_parameterization_override_and_refusals(diffusers, unet):
    assert diffusers_denoiser(unet, {"prediction_type": "epsilon"}, parameterization="x0").parameterization == "x0"
    with pytest.raises(ValueError, match="prediction_type"):
        diffusers_denoiser(unet, {"prediction_type": "flow"})
    fourier = diffusers.UNet2DModel(**{**TINY, "time_embedding_type": "fourier"})
    with pytest.raises(ValueError, match="fourier"):
        diffusers_denoiser(fourier)


def test_diffusers_learned_time_embedding_rounds(diffusers):
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(**{**TINY, "time_embedding_type": "learned", "num_train_timesteps": 1000}).eval()
    den = diffusers_denoiser(net)
    abar = diffusers_alphas_cumprod()
    s0, s1 = _sigma_at(abar, 250), _sigma_at(abar, 251)
    s = s0 + 0.1 * (s1 - s0)  # t ~ 250.1: the lookup table gets 250
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        d = den(x, s)
        expected = x - s * net(x / math.sqrt(1 + s ** 2), 250).sample
    _close(d, expected)


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_diffusers_folder_round_trip(diffusers, unet, tmp_path, layout):
    cfg = {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}
    sched = diffusers.DDPMScheduler(**cfg)
    if layout == "pipeline":
        unet.save_pretrained(tmp_path / "unet")
        sched.save_config(tmp_path / "scheduler")
        assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    else:
        unet.save_pretrained(tmp_path)
        sched.save_config(tmp_path)
    den = load_external("diffusers", tmp_path)
    ref = diffusers_denoiser(unet, cfg)
    assert den.parameterization == "v" and torch.equal(den.log_sigmas, ref.log_sigmas)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(den(x, 1.7), ref(x, 1.7))
