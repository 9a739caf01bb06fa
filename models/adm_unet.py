"""guided-diffusion / ADM at any size: its ``UNetModel`` built from its settings (``model_config.yaml``).

:class:`ADMUNet` rebuilds the network from deepinv's copies of guided-diffusion's blocks (parameter
names unchanged, so its state dicts load with ``strict=True``); :func:`adm_settings` reads a settings
file and :func:`infer_adm_settings` what a state dict's shapes fix. deepinv is imported lazily.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

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
