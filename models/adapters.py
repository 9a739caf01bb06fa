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

deepinv and diffusers are imported lazily (diffusers is a dev/optional dependency).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from .denoiser import VPDenoiser
from .schedules import ddpm_linear_alphas_cumprod

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DModel

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
# guided-diffusion / ADM at any size: the UNet built from its settings (``model_config.yaml``)
# --------------------------------------------------------------------------------------------

#: guided-diffusion's ``model_and_diffusion_defaults()`` (script_util.py), the keys of DPS's
#: ``configs/model_config.yaml`` and of its ``diffusion_config.yaml`` that matter here.
ADM_CONFIG_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False,
    "diffusion_steps": 1000, "noise_schedule": "linear", "predict_xstart": False, "rescale_timesteps": False,
}
#: guided-diffusion's ``create_model`` default ``channel_mult`` per ``image_size`` (32: improved-diffusion's).
ADM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
#: Keys of a config file that are not settings of the network or its schedule (DPS: model_path, ...).
_ADM_IGNORED = {"model_path", "batch_size", "use_checkpoint", "dropout", "use_fp16", "sampler", "timestep_respacing",
                "model_var_type", "dynamic_threshold", "clip_denoised", "use_kl", "rescale_learned_sigmas"}


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional) with any settings, from deepinv's copies of its blocks.

    The arguments are ``UNetModel``'s own: ``attention_resolutions`` holds *downsampling rates*
    (``image_size // resolution``), ``channel_mult`` the width of each level. Parameter names are
    guided-diffusion's, so its state dicts load with ``strict=True``; with the FFHQ settings it is
    deepinv's ``DiffUNet(large_model=False)`` exactly. ``forward(x_t, t)`` returns the raw output
    (``2C`` channels for learned-variance models), ``t`` may be fractional. Dropout is kept in the
    module (eval mode switches it off).
    """

    def __init__(self, in_channels: int = 3, model_channels: int = 128, out_channels: int = 6,
                 num_res_blocks: int = 1, attention_resolutions=(16,), channel_mult=(1, 1, 2, 2, 4, 4),
                 num_heads: int = 4, num_head_channels: int = 64, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_new_attention_order: bool = False, dropout: float = 0.0, conv_resample: bool = True):
        super().__init__()
        from deepinv.models.diffunet import (
            AttentionBlock, Downsample, ResBlock, TimestepEmbedSequential, Upsample, normalization, zero_module,
        )

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.channel_mult = tuple(channel_mult)
        attention_resolutions = {int(a) for a in attention_resolutions}
        temb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, temb), nn.SiLU(), nn.Linear(temb, temb))

        def res(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, temb, dropout, out_channels=ch_out, dims=2,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (res(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=2, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=2, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.channel_mult) - 1)

    def forward_diffusion(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from deepinv.models.diffunet import timestep_embedding

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    forward = forward_diffusion


def _as_int_tuple(v, name: str) -> tuple:
    """``"16,8"``, ``16``, ``[16, 8]`` -> ``(16, 8)`` (``channel_mult`` may hold 0.5)."""
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
    elif isinstance(v, (int, float)):
        parts = [v]
    else:
        parts = list(v)
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected numbers separated by commas, got {v!r}") from None
    return tuple(int(p) if float(p).is_integer() else p for p in out)


def _key_ints(sd: Mapping[str, Any], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)})


def infer_adm_settings(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The guided-diffusion settings a state dict determines (``model_config.yaml`` keys).

    Read off the weights: ``in_channels``, ``num_channels``, ``learn_sigma``, ``num_res_blocks``,
    ``channel_mult``, ``attention_ds`` (downsampling rates with attention), ``resblock_updown``,
    ``use_scale_shift_norm``, ``class_cond``. Not stored in weights (and so not returned):
    ``image_size``, ``num_heads``/``num_head_channels``, ``use_new_attention_order``.
    """
    try:
        c_in = int(sd["input_blocks.0.0.weight"].shape[1])
        mc = int(sd["time_embed.0.weight"].shape[1])
        c_out = int(sd["out.2.weight"].shape[0])
        first = int(sd["input_blocks.0.0.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"not a guided-diffusion UNet state dict (missing {e})") from None
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"output channels {c_out} are neither C nor 2C for C={c_in}")
    outs = _key_ints(sd, "output_blocks.")
    # an output block that upsamples ends a level: it holds a second ResBlock (resblock_updown) or an Upsample conv
    ups = [i for i in outs if any(f"output_blocks.{i}.{j}.{name}" in sd
                                  for j in (1, 2) for name in ("in_layers.0.weight", "conv.weight"))]
    per_level = (ups[0] + 1) if ups else len(outs)
    if not outs or len(outs) % per_level:
        raise ValueError("cannot read the level structure of this guided-diffusion state dict")
    levels = len(outs) // per_level
    r = per_level - 1
    mult = []
    for level in range(levels):  # output blocks run over the levels in reverse
        i = (levels - 1 - level) * per_level
        w = int(sd[f"output_blocks.{i}.0.out_layers.3.weight"].shape[0])
        mult.append(w // mc if w % mc == 0 else w / mc)
    attention_ds = sorted({2 ** level for level in range(levels) for j in range(r)
                           if f"input_blocks.{1 + level * (r + 1) + j}.1.qkv.weight" in sd})
    down = 1 + r  # the first downsampling block
    updown = levels > 1 and f"input_blocks.{down}.0.in_layers.0.weight" in sd
    scale_shift = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]) == 2 * int(
        sd["input_blocks.1.0.out_layers.3.weight"].shape[0])
    if first != int(mult[0] * mc):
        raise ValueError("inconsistent guided-diffusion state dict (first conv width)")
    return {"in_channels": c_in, "num_channels": mc, "learn_sigma": c_out == 2 * c_in, "num_res_blocks": r,
            "channel_mult": ",".join(str(m) for m in mult), "attention_ds": attention_ds, "resblock_updown": updown,
            "use_scale_shift_norm": scale_shift, "class_cond": "label_emb.weight" in sd}


def adm_settings(config: Mapping[str, Any] | None = None,
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, dict, list[str]]:
    """``(unet_args, settings, inferred)`` from a guided-diffusion config and/or a state dict.

    ``config`` uses the keys of DPS's ``model_config.yaml`` / guided-diffusion's
    ``create_model`` (``image_size``, ``num_channels``, ``num_res_blocks``, ``attention_resolutions``,
    ``channel_mult``, ``learn_sigma``, ``num_heads``, ``num_head_channels``, ...) and of its diffusion
    config (``diffusion_steps`` or ``steps``, ``noise_schedule``, ``predict_xstart``,
    ``rescale_timesteps``); ``in_channels`` is an extension (guided-diffusion fixes 3). What the
    config leaves out is read off the state dict where the weights determine it; ``image_size``
    then follows from the number of levels (guided-diffusion's ``channel_mult`` table) and the
    attention heads default to 64 channels per head (every released guided-diffusion model).
    ``inferred`` lists the settings that came from neither the config nor the weights.
    """
    cfg = {("diffusion_steps" if k == "steps" else k): v for k, v in dict(config or {}).items()}
    unknown = sorted(set(cfg) - set(ADM_CONFIG_DEFAULTS) - _ADM_IGNORED - {"in_channels"})
    if unknown:
        raise ValueError(f"unknown guided-diffusion settings {unknown}; known: {sorted(ADM_CONFIG_DEFAULTS)}")
    found = infer_adm_settings(state_dict) if state_dict is not None else {}
    inferred: list[str] = []
    s = dict(cfg)
    for k in ("in_channels", "num_channels", "learn_sigma", "num_res_blocks", "channel_mult", "resblock_updown",
              "use_scale_shift_norm", "class_cond"):
        if k not in s and k in found:
            s[k] = found[k]
    if s.get("class_cond"):
        raise ValueError("class-conditional guided-diffusion models are not supported (they need a class label)")
    if "image_size" not in s:
        levels = len(_as_int_tuple(s["channel_mult"], "channel_mult")) if s.get("channel_mult") else None
        by_levels = {len(m): size for size, m in ADM_CHANNEL_MULT.items() if size != 32}
        if levels not in by_levels:
            raise ValueError("image_size is not stored in the weights and the number of levels does not "
                             "name one; give it in --config (e.g. image_size: 256)")
        s["image_size"] = by_levels[levels]
        inferred.append("image_size")
    size = int(s["image_size"])
    if "attention_resolutions" not in s and "attention_ds" in found:
        attention_ds = tuple(found["attention_ds"])
    else:
        res = _as_int_tuple(s.get("attention_resolutions", ADM_CONFIG_DEFAULTS["attention_resolutions"]),
                            "attention_resolutions")
        attention_ds = tuple(size // int(r) for r in res)
    mult = s.get("channel_mult", "")
    mult = ADM_CHANNEL_MULT.get(size) if mult in ("", None) else _as_int_tuple(mult, "channel_mult")
    if mult is None:
        raise ValueError(f"no default channel_mult for image_size {size}; give channel_mult in --config")
    if "num_heads" not in s and "num_head_channels" not in s:
        widths = {int(m * int(s.get("num_channels", 128))) for m in mult}
        if all(w % 64 == 0 for w in widths):
            s["num_head_channels"] = 64
        inferred.append("num_head_channels" if "num_head_channels" in s else "num_heads")
    if "use_new_attention_order" not in s:
        inferred.append("use_new_attention_order")
    s = {**ADM_CONFIG_DEFAULTS, **s}
    c = int(s.get("in_channels", 3))
    args = {"in_channels": c, "model_channels": int(s["num_channels"]),
            "out_channels": 2 * c if s["learn_sigma"] else c, "num_res_blocks": int(s["num_res_blocks"]),
            "attention_resolutions": sorted(attention_ds), "channel_mult": list(mult),
            "num_heads": int(s["num_heads"]), "num_head_channels": int(s["num_head_channels"]),
            "num_heads_upsample": int(s["num_heads_upsample"]), "use_scale_shift_norm": bool(s["use_scale_shift_norm"]),
            "resblock_updown": bool(s["resblock_updown"]),
            "use_new_attention_order": bool(s["use_new_attention_order"])}
    multiple = 2 ** (len(mult) - 1)
    if size % multiple:
        raise ValueError(f"image_size {size} is not a multiple of {multiple} ({len(mult)} levels)")
    if state_dict is not None:
        for k in ("in_channels", "num_channels", "learn_sigma", "num_res_blocks"):
            if k in cfg and k in found and cfg[k] != found[k]:
                raise ValueError(f"--config says {k}={cfg[k]!r}, the weights have {k}={found[k]!r}")
    settings = {k: s[k] for k in ADM_CONFIG_DEFAULTS if k not in ("use_checkpoint", "dropout", "use_fp16")}
    settings.update(in_channels=c, image_size=size, channel_mult=",".join(str(m) for m in mult),
                    attention_resolutions=",".join(str(size // d) for d in sorted(attention_ds, reverse=True)))
    return args, settings, inferred


# --------------------------------------------------------------------------------------------
# diffusers UNet2DModel
# --------------------------------------------------------------------------------------------

#: ``DDPMScheduler()``'s defaults for the keys read here.
DIFFUSERS_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _scheduler_dict(scheduler_config) -> dict[str, Any]:
    if scheduler_config is None:
        cfg = {}
    elif isinstance(scheduler_config, Mapping):
        cfg = dict(scheduler_config)
    elif hasattr(scheduler_config, "config"):  # a diffusers scheduler object
        cfg = dict(scheduler_config.config)
    else:
        raise TypeError("scheduler_config must be a dict, a diffusers scheduler or None")
    return {**DIFFUSERS_SCHEDULER_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}


def _betas_for_alpha_bar(n: int, alpha_bar_fn: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    betas = [min(1 - alpha_bar_fn((i + 1) / n) / alpha_bar_fn(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 Algorithm 1, as diffusers' ``rescale_zero_terminal_snr``."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def diffusers_alphas_cumprod(scheduler_config=None) -> torch.Tensor:
    """``alphas_cumprod`` exactly as ``diffusers.DDPMScheduler`` computes it (float32), returned as float64.

    Reads ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``,
    ``laplace``) or ``trained_betas``, ``beta_start``, ``beta_end``, ``num_train_timesteps`` and
    ``rescale_betas_zero_snr``. A zero terminal ``alpha_bar`` (zero-SNR rescaling) is set to
    ``2**-24``, as diffusers' Euler schedulers do, so that sigma stays finite.
    """
    cfg = _scheduler_dict(scheduler_config)
    n, b0, b1, kind = int(cfg["num_train_timesteps"]), cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif kind == "laplace":
        def laplace(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))
        betas = _betas_for_alpha_bar(n, laplace)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (b1 - b0) + b0
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
    abar[abar <= 0] = 2.0 ** -24
    return abar


class DiffusersNet(nn.Module):
    """``net(x_t, t) -> unet(x_t, t).sample`` for a diffusers ``UNet2DModel`` (fractional ``t`` passed through;
    rounded for ``time_embedding_type="learned"``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self._round = cfg.get("time_embedding_type", "positional") == "learned"
        self._n = int(cfg.get("num_train_timesteps") or 1000)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._round:
            t = t.round().long().clamp(0, self._n - 1)
        return self.unet(x_t, t, return_dict=False)[0]


def diffusers_denoiser(unet: "UNet2DModel", scheduler_config: Mapping[str, Any] | Any | None = None, *,
                       parameterization: str | None = None,
                       shape: tuple[int, int, int] | None = None) -> VPDenoiser:
    """A diffusers ``UNet2DModel`` DDPM network as a :class:`VPDenoiser`.

    ``scheduler_config`` is a dict as in ``scheduler_config.json`` (or a scheduler object);
    missing keys take ``DDPMScheduler``'s defaults. ``prediction_type`` maps ``epsilon -> eps``,
    ``v_prediction -> v``, ``sample -> x0``; ``parameterization`` overrides it. ``shape`` defaults
    to ``(in_channels, *sample_size)``. The first ``in_channels`` output channels are kept
    (``variance_type="learned*"`` models output ``2C``). Score-SDE models
    (``time_embedding_type="fourier"``, VE) and class-conditional ones are refused.
    The UNet is put in eval mode.
    """
    ucfg = unet.config
    if ucfg.get("time_embedding_type", "positional") == "fourier":
        raise ValueError("time_embedding_type='fourier' is a score-SDE (VE) model, not a DDPM; use VEDenoiser")
    if getattr(unet, "class_embedding", None) is not None:
        raise ValueError("class-conditional UNet2DModel checkpoints are not supported")
    cfg = _scheduler_dict(scheduler_config)
    if parameterization is None:
        pt = cfg["prediction_type"]
        if pt not in _PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {pt!r}; expected one of {sorted(_PREDICTION_TYPES)}")
        parameterization = _PREDICTION_TYPES[pt]
    c = int(ucfg["in_channels"])
    if shape is None:
        size = ucfg.get("sample_size")
        if size is None:
            raise ValueError("the UNet config has no sample_size: pass shape=(C, H, W)")
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        shape = (c, *hw)
    unet.eval()
    return VPDenoiser(DiffusersNet(unet), diffusers_alphas_cumprod(cfg), tuple(shape),
                      parameterization=parameterization, out_channels=c)


def load_diffusers_folder(path: str | Path, **kw) -> VPDenoiser:
    """A local diffusers folder as a :class:`VPDenoiser`, offline and without pickles.

    Either a pipeline folder (``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``,
    ``scheduler/scheduler_config.json``) or a flat one (``config.json`` + weights, with an
    optional ``scheduler_config.json`` beside them). Without a scheduler config, DDPMScheduler's
    defaults apply. ``kw`` go to :func:`diffusers_denoiser`.
    """
    from diffusers import UNet2DModel

    root = Path(path)
    load = dict(use_safetensors=True, local_files_only=True)
    if (root / "unet" / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(str(root), subfolder="unet", **load)
        sched = root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(str(root), **load)
        sched = root / "scheduler_config.json"
    else:
        raise FileNotFoundError(f"{root}: neither unet/config.json nor config.json found")
    cfg = json.loads(sched.read_text()) if sched.is_file() else None
    return diffusers_denoiser(unet, cfg, **kw)


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
