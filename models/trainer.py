"""One training run's state and step: the U-Net, its EMA, Adam and the RNG, and the two objectives.

EDM (Karras et al. 2022): denoising score matching with EDM's preconditioning, noise levels
``ln sigma ~ N(P_mean = -1.2, P_std = 1.2)`` and loss weight
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``, ``sigma_data = 0.5``.
Flow matching: the velocity ``z - x0`` of ``x_t = (1 - t) x0 + t z`` at ``t = sigma / (1 + sigma)``,
the same noise levels. :mod:`models.train` drives a :class:`Trainer` over a data set.
"""
from __future__ import annotations

import copy

import torch

from .card import utc_now
from .denoiser import Denoiser, EDMPrecond, FlowDenoiser
from .unet import UNet

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def parse_mult(v) -> list[int]:
    """``channel_mult`` as a list of ints (from ``"1,2,2,2"`` or a list)."""
    return [int(t) for t in v.split(",")] if isinstance(v, str) else [int(t) for t in v]


def arch_args(cfg: dict, channels: int) -> dict:
    return {"in_channels": channels, "out_channels": channels, "base": cfg["base_channels"],
            "channel_mult": parse_mult(cfg["channel_mult"]), "blocks_per_level": cfg["blocks_per_level"],
            "attention": bool(cfg["attention"])}


def augment_mode(cfg: dict, kind: str) -> str:
    """The config's ``augment``, with ``auto`` resolved: ``d4`` for PDE data, flips for phantoms, none for folders."""
    mode = cfg["augment"]
    if mode != "auto":
        return mode
    return {"phantom": "flips", "folder": "none"}.get(kind, "d4")


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random x/y flips (and transposes for ``d4``) per sample; draws 3 uniforms per sample always."""
    r = torch.rand((x.shape[0], 3), generator=gen) < 0.5
    if mode == "none":
        return x
    r = r.to(x.device)[:, :, None, None, None]
    x = torch.where(r[:, 0], x.flip(-1), x)
    x = torch.where(r[:, 1], x.flip(-2), x)
    if mode == "d4" and x.shape[-1] == x.shape[-2]:
        x = torch.where(r[:, 2], x.transpose(-1, -2), x)
    return x


def edm_loss(precond: EDMPrecond, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EDM loss ``E[lambda(sigma) |D(x + sigma n, sigma) - x|^2]``, mean over batch and pixels."""
    sigma, noise = _draw_sigma_noise(x, gen)
    s = sigma.view(-1, 1, 1, 1).to(x.dtype)
    weight = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
    den = precond(x + s * noise, sigma)
    return (weight * (den - x) ** 2).mean()


def flow_loss(model: FlowDenoiser, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Conditional flow matching ``E |v(x_t, t) - (z - x0)|^2`` on ``x_t = (1 - t) x0 + t z``.

    ``t = sigma / (1 + sigma)`` with ``ln sigma ~ N(P_mean, P_std)`` as in ``edm_loss``: a logit-normal
    ``t`` (logit t ~ N(-1.2, 1.2)), so both objectives see the same noise levels and budget."""
    sigma, z = _draw_sigma_noise(x, gen)
    t = model.t_of(sigma).view(-1, 1, 1, 1).to(x.dtype)
    x_t = (1 - t) * x + t * z
    return ((model.velocity(x_t, sigma) - (z - x)) ** 2).mean()


def _draw_sigma_noise(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = (torch.randn(x.shape[0], generator=gen) * P_STD + P_MEAN).exp().to(x.device)
    return sigma, torch.randn(x.shape, generator=gen).to(x.device, x.dtype)


def make_denoiser(objective: str, net: torch.nn.Module, shape) -> Denoiser:
    """The ``D(x, sigma)`` a trained network is served as (``objective`` from the config)."""
    if objective == "flow":
        return FlowDenoiser(net, shape, SIGMA_MIN, SIGMA_MAX)
    return EDMPrecond(net, shape, SIGMA_DATA, SIGMA_MIN, SIGMA_MAX)


class Trainer:
    """Model, EMA, optimizer and RNG of one run; packs into and out of flat tensor dicts."""

    def __init__(self, cfg: dict, shape, device: torch.device):
        self.cfg, self.shape, self.device = cfg, tuple(shape), device
        with torch.random.fork_rng(devices=[]):  # seeded initialization, global RNG untouched
            torch.manual_seed(cfg["seed"])
            self.net = UNet(**arch_args(cfg, shape[0])).to(device)
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.precond = make_denoiser(cfg.get("objective", "edm"), self.net, shape)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
        self.gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # batches, augmentation, sigma, noise
        self.step, self.loss_ema, self.wall_time = 0, None, 0.0
        self.history: list[list[float]] = []
        self.started = utc_now()

    def pack(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, st in self.opt.state_dict()["state"].items():
            for name, v in st.items():
                t[f"adam.{i}.{name}"] = v.reshape(-1) if v.dim() == 0 else v
        t["rng.cpu"] = self.gen.get_state()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in t.items()}

    def unpack(self, t: dict[str, torch.Tensor], with_optimizer: bool = True) -> None:
        self.net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        if with_optimizer and any(k.startswith("adam.") for k in t):
            sd = self.opt.state_dict()
            state: dict[int, dict] = {}
            for k, v in t.items():
                if k.startswith("adam."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
            sd["state"] = state
            self.opt.load_state_dict(sd)
        if "rng.cpu" in t:
            self.gen.set_state(t["rng.cpu"])

    def scalars(self) -> dict:
        return {"step": self.step, "loss_ema": self.loss_ema, "wall_time_s": self.wall_time,
                "started": self.started, "updated": utc_now(), "history": self.history}

    def load_scalars(self, s: dict) -> None:
        self.step, self.loss_ema = int(s["step"]), s.get("loss_ema")
        self.wall_time, self.started = float(s.get("wall_time_s", 0.0)), s.get("started", utc_now())
        self.history = s.get("history", [])

    def lr(self) -> float:
        w = self.cfg["warmup"]
        return self.cfg["lr"] * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def train_step(self, x_all: torch.Tensor, aug: str) -> float:
        cfg = self.cfg
        idx = torch.randint(x_all.shape[0], (cfg["batch"],), generator=self.gen)
        x = augment(x_all[idx.to(x_all.device)].to(self.device), aug, self.gen)
        loss = (flow_loss if isinstance(self.precond, FlowDenoiser) else edm_loss)(self.precond, x, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.net.parameters():  # EDM: never let one bad batch poison the weights
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg["grad_clip"] and cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg["grad_clip"])
        for g in self.opt.param_groups:
            g["lr"] = self.lr()
        self.opt.step()
        self.step += 1
        # EMA with a half-life in images (EDM), ramped up early in training
        nimg = self.step * cfg["batch"]
        half = cfg["ema_halflife_kimg"] * 1000
        if cfg["ema_rampup"]:
            half = min(half, nimg * cfg["ema_rampup"])
        beta = 0.5 ** (cfg["batch"] / max(half, 1e-8))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p.detach(), 1 - beta)
            for be, b in zip(self.ema.buffers(), self.net.buffers()):
                be.copy_(b)
        val = float(loss.detach())
        self.loss_ema = val if self.loss_ema is None else 0.99 * self.loss_ema + 0.01 * val
        return val
