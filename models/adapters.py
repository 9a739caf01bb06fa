"""Adapters for checkpoints trained outside reconserve: each one ends as a :class:`VPDenoiser`.

Two families of discrete-time DDPM checkpoints are supported, both turned into the one
contract ``D(x, sigma) -> x0_hat`` (``x = x0 + sigma * n``) by :class:`~models.denoiser.VPDenoiser`:

* **guided-diffusion / ADM** (Dhariwal & Nichol 2021; e.g. DPS's FFHQ-256 ``ffhq_10m.pt``, the
  unconditional ImageNet-256 model), built offline through ``deepinv.models.DiffUNet`` whose
  parameter names are guided-diffusion's own (deepinv loads those ``.pt`` files with
  ``strict=True``), so no key mapping is needed beyond unwrapping / prefix stripping.
  These are eps-prediction networks with learned variance (``2C`` output channels, the first
  ``C`` are eps) on the linear beta schedule ``1e-4 .. 0.02`` over 1000 steps.
* **diffusers** ``UNet2DModel`` DDPM checkpoints (a folder with ``unet/`` and ``scheduler/``),
  whose ``prediction_type`` and beta schedule are read from the scheduler config.

Timesteps: guided-diffusion and diffusers networks were trained on integer timesteps
``0 .. T-1`` (guided-diffusion with ``rescale_timesteps=False``, as in DPS). Both embed the
timestep with a continuous sinusoid, so ``VPDenoiser`` passes the *fractional* timestep that
interpolates ``log sigma`` between the trained levels straight through; at a trained sigma it is
exactly the integer timestep. (diffusers' ``time_embedding_type="learned"`` is a lookup table:
there the timestep is rounded to the nearest integer.)

Loading never unpickles code: ``.pt``/``.pth`` go through ``torch.load(weights_only=True)``,
diffusers folders through ``use_safetensors=True``. Nothing is downloaded.

deepinv and diffusers are imported lazily (diffusers is a dev/optional dependency). This module holds
the fixed-architecture ADM path (deepinv's ``DiffUNet``) and the registry; :mod:`models.adm_unet`
builds ADM networks of any size, :mod:`models.diffusers_adapter` the diffusers path (names
re-exported here).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .adm_unet import ADMUNet, adm_settings, infer_adm_settings
from .denoiser import VPDenoiser
from .diffusers_adapter import DiffusersNet, diffusers_alphas_cumprod, diffusers_denoiser, load_diffusers_folder
from .schedules import ddpm_linear_alphas_cumprod

__all__ = [
    "ADAPTERS", "ADMNet", "ADMUNet", "DiffusersNet", "adm_alphas_cumprod", "adm_denoiser", "adm_settings",
    "diffusers_alphas_cumprod", "diffusers_denoiser", "infer_adm_settings", "load_adm", "load_adm_state_dict",
    "load_diffusers_folder", "load_external",
]


# --------------------------------------------------------------------------------------------
# guided-diffusion / ADM through deepinv's DiffUNet
# --------------------------------------------------------------------------------------------

#: DiffUNet registers these (persistent) buffers for its own ``forward_denoise``; guided-diffusion
#: checkpoints do not have them, and they are not needed here.
_DIFFUNET_EXTRA_BUFFERS = ("sqrt_1m_alphas_cumprod", "sqrt_alphas_cumprod")
#: Prefixes stripped when every key carries one (DataParallel, our adapter's own state dict, ...).
_ADM_PREFIXES = ("module.", "net.unet.", "unet.", "model.")
#: Keys under which training scripts nest the weights.
_ADM_NESTING = ("state_dict", "model", "ema", "ema_model", "model_ema")
#: DiffUNet's downsampling: channel_mult (1, 1, 2, 2, 4, 4) gives 5 halvings.
_ADM_MULTIPLE = 32


class ADMNet(nn.Module):
    """``net(x_t, t) -> raw output`` of a guided-diffusion UNet (``DiffUNet.forward_diffusion``).

    The raw output has ``2C`` channels for learned-variance models (eps first, then the
    variance interpolation); :class:`VPDenoiser` keeps the first ``C`` (its ``out_channels``).
    ``t`` may be fractional: the sinusoidal embedding is continuous. ``H`` and ``W`` must be
    multiples of 32 (DiffUNet's own ``forward`` pads; this raw call does not).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_diffusion(x_t, t)


def adm_alphas_cumprod(num_timesteps: int = 1000, schedule: str = "linear") -> torch.Tensor:
    """guided-diffusion's ``get_named_beta_schedule`` as ``alpha_bar`` (float64, as it computes it).

    ``linear``: betas ``linspace(1e-4, 0.02)`` scaled by ``1000 / num_timesteps``;
    ``cosine``: Nichol & Dhariwal's ``cos^2((t + 0.008) / 1.008 * pi / 2)`` with betas capped at 0.999.
    """
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return ddpm_linear_alphas_cumprod(num_timesteps, scale * 1e-4, scale * 0.02)
    if schedule == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)]
        return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    raise ValueError(f"unknown guided-diffusion noise schedule {schedule!r}; use 'linear' or 'cosine'")


def _normalize_adm_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap nesting, strip a common prefix, drop DiffUNet's extra buffers and non-tensors."""
    for _ in range(3):  # e.g. {"ema": {"state_dict": {...}}}
        if not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _ADM_NESTING if isinstance(sd.get(k), Mapping)), None)
            if inner is None:
                break
            sd = inner
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError("no tensors found in the ADM checkpoint")
    changed = True
    while changed:
        changed = False
        for p in _ADM_PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return {k: v for k, v in out.items() if k not in _DIFFUNET_EXTRA_BUFFERS}


def load_adm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a guided-diffusion state dict from ``.safetensors`` or ``.pt``/``.pth`` (``weights_only``).

    Returns guided-diffusion key names (== DiffUNet's): nesting under ``state_dict``/``model``/
    ``ema`` is unwrapped, a ``module.`` (or our adapter's ``net.unet.``) prefix is stripped, and
    DiffUNet's own ``sqrt_*alphas_cumprod`` buffers are dropped. Pickled code is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return _normalize_adm_state_dict(sd)


def _infer_adm_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``in_channels``, ``large_model`` and ``learn_sigma`` read off a guided-diffusion state dict."""
    try:
        c_in = int(sd["input_blocks.0.0.weight"].shape[1])
        model_channels = int(sd["time_embed.0.weight"].shape[1])
        c_out = int(sd["out.2.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"not a guided-diffusion UNet state dict (missing {e})") from None
    if model_channels not in (128, 256):
        raise ValueError(f"DiffUNet only builds model_channels 128 (FFHQ) or 256 (ImageNet), "
                         f"the checkpoint has {model_channels}")
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"output channels {c_out} are neither C nor 2C for C={c_in}")
    return {"in_channels": c_in, "large_model": model_channels == 256, "learn_sigma": c_out == 2 * c_in}


def adm_denoiser(state_dict: Mapping[str, torch.Tensor] | None = None, *, in_channels: int | None = None,
                 large_model: bool | None = None, learn_sigma: bool | None = None,
                 image_size: int | tuple[int, int] = 256, num_timesteps: int = 1000,
                 noise_schedule: str = "linear", alphas_cumprod: torch.Tensor | None = None,
                 use_fp16: bool = False) -> VPDenoiser:
    """A guided-diffusion UNet (deepinv ``DiffUNet``, built offline) as an eps :class:`VPDenoiser`.

    ``DiffUNet`` has two fixed architectures: the FFHQ one (``large_model=False``: 128 channels,
    1 res block, attention at 16x16 of 256, ~94M params; DPS's ``ffhq_10m.pt``) and the ImageNet
    one (``large_model=True``: 256 channels, 2 res blocks, attention at 32/16/8; the unconditional
    ``256x256_diffusion_uncond.pt``). Class-conditional ADM checkpoints are not supported.

    With a ``state_dict`` (guided-diffusion names, see :func:`load_adm_state_dict`) ``in_channels``,
    ``large_model`` and ``learn_sigma`` default to what it holds; given explicitly they must agree.
    Without one the weights are random (tests) and the defaults are 3, False, True.
    ``image_size`` (int or ``(H, W)``, multiples of 32) only sets ``VPDenoiser.shape``: the network
    is convolutional. ``alphas_cumprod`` overrides the guided-diffusion ``noise_schedule``.
    The network is put in eval mode (DiffUNet has dropout 0.1).
    """
    from deepinv.models import DiffUNet

    given = {"in_channels": in_channels, "large_model": large_model, "learn_sigma": learn_sigma}
    if state_dict is not None:
        state_dict = _normalize_adm_state_dict(state_dict)
        found = _infer_adm_config(state_dict)
        for k, v in given.items():
            if v is not None and v != found[k]:
                raise ValueError(f"{k}={v!r} disagrees with the state dict ({k}={found[k]!r})")
        cfg = found
    else:
        cfg = {"in_channels": 3, "large_model": False, "learn_sigma": True}
        cfg.update({k: v for k, v in given.items() if v is not None})

    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or any(s <= 0 or s % _ADM_MULTIPLE for s in hw):
        raise ValueError(f"image_size must be a positive multiple of {_ADM_MULTIPLE}, got {image_size}")

    c = int(cfg["in_channels"])
    c_out = 2 * c if cfg["learn_sigma"] else c
    # use_fp16: guided-diffusion's scheme (input/middle/output block convs in fp16, the rest fp32);
    # load_state_dict below casts fp32 checkpoint tensors into the fp16 parameters.
    unet = DiffUNet(in_channels=c, out_channels=c_out, large_model=bool(cfg["large_model"]),
                    use_fp16=use_fp16, pretrained=None)
    if unet.out_channels != c_out:  # DiffUNet forces 3 -> 6: a fixed-variance RGB model needs 3
        old = unet.out[2]
        unet.out[2] = nn.Conv2d(old.in_channels, c_out, 3, padding=1)
        nn.init.zeros_(unet.out[2].weight)
        nn.init.zeros_(unet.out[2].bias)
        unet.out_channels = c_out
    if state_dict is not None:
        missing, unexpected = unet.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k not in _DIFFUNET_EXTRA_BUFFERS]
        if missing or unexpected:
            raise ValueError(f"state dict does not match DiffUNet: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
    unet.eval()

    abar = alphas_cumprod if alphas_cumprod is not None else adm_alphas_cumprod(num_timesteps, noise_schedule)
    return VPDenoiser(ADMNet(unet), torch.as_tensor(abar, dtype=torch.float64), (c, *hw),
                      parameterization="eps", out_channels=c)


def load_adm(path: str | Path, **kw) -> VPDenoiser:
    """:func:`adm_denoiser` on the weights in ``path`` (``.safetensors``, ``.pt``, ``.pth``)."""
    return adm_denoiser(load_adm_state_dict(path), **kw)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[..., VPDenoiser]] = {
    "adm": load_adm,
    "diffusers": load_diffusers_folder,
}


def load_external(kind: str, path: str | Path, **kw) -> VPDenoiser:
    """Load an outside checkpoint of the given ``kind`` (a key of :data:`ADAPTERS`) as a denoiser."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {sorted(ADAPTERS)}")
    return ADAPTERS[kind](path, **kw)
