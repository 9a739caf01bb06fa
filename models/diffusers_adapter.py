"""diffusers ``UNet2DModel`` DDPM checkpoints as a :class:`~models.denoiser.VPDenoiser`.

The scheduler config (``prediction_type``, beta schedule) is read as ``diffusers.DDPMScheduler`` reads
it; see :mod:`models.adapters` for the timestep convention. diffusers is imported lazily.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from .denoiser import VPDenoiser

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DModel

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
