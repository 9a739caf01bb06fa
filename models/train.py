"""Train an EDM denoiser (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Denoising score matching with EDM's preconditioning (``EDMPrecond(UNet)``), noise levels
``ln sigma ~ N(P_mean = -1.2, P_std = 1.2)`` and loss weight
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``, ``sigma_data = 0.5``.

* Data are normalized per channel to network space ``x_net = (x_phys - shift) / scale`` with
  mean 0 and standard deviation 0.5 (Darcy ``a`` in {3, 12}: ``shift = 7.5, scale = 9`` so
  ``a -> +-0.5``); the card records ``normalization: {shift, scale}`` with
  ``x_phys = shift + scale * x_net``.
* Adam with linear learning-rate warm-up, gradient clipping, EMA of the weights with an
  EDM-style half-life in images (with ramp-up).
* Augmentation: the dihedral symmetries of the square are exact symmetries of the discrete
  Darcy / Poisson / Helmholtz problems on the node grid (5-point stencil, ``f = 1``, a
  constant source statistic, zero Dirichlet boundary): flipping or transposing ``(a, u)``
  together gives another exact solution pair of an equally likely coefficient. They are
  on (``d4``: x/y flips and transposes) for the PDE sets. Phantoms use x/y flips only
  (heads are upright and taller than wide, a transpose would change that distribution).
  Folders of user data get none unless ``--augment`` says so.
* A folder of your own data (``--data PATH``: ``.png``/``.tif`` images or ``.npy`` arrays) is used
  at its native size, or with ``--resolution N`` brought to ``N x N``: the centred square crop of
  each image (side ``min(H, W)``), resized with antialiased bilinear interpolation (so images of
  different sizes may share the folder). The card records the channels (``gray`` or ``r, g, b``
  for images), ``value_range`` ``[0, 1]`` for images (8/16-bit files are scaled into it) or the
  data range for arrays, and recommends the ``fast`` method with 50 steps.
* Resumable: every ``--save-every`` steps, at the end, at ``--time-limit-min`` and on
  SIGINT/SIGTERM it writes the full state (model, EMA, Adam moments, RNG state; no pickle)
  to ``runs/<id>/state.safetensors`` + ``state.json``, the same state to
  ``checkpoints/<id>/resume.safetensors`` (float32, JSON in its metadata) and the EMA
  network with its card via ``models.checkpoint.save_checkpoint``. ``--resume`` continues
  from the newest of these bit for bit on the same device and thread count; from a bare
  ``checkpoints/<id>/weights.safetensors`` it restarts with model = EMA and a fresh optimizer.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import data as D
from .checkpoint import CARD, WEIGHTS, save_checkpoint, save_tensors
from .formats import DEFAULT_METHODS
from .denoiser import Denoiser, EDMPrecond, FlowDenoiser
from .unet import UNet

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
STATE_TENSORS, STATE_JSON, RESUME = "state.safetensors", "state.json", "resume.safetensors"

# Settings that define the model and its data: taken from the saved state on --resume.
_STRUCTURAL = ("objective", "data", "resolution", "num_examples", "data_seed", "base_channels", "channel_mult",
               "blocks_per_level", "attention")
_DEFAULTS = dict(data="darcy", resolution=64, num_examples=10000, data_seed=0, base_channels=32,
                 channel_mult="1,2,2,2", blocks_per_level=1, attention=True, steps=20000, batch=16,
                 lr=2e-4, warmup=500, grad_clip=1.0, ema_halflife_kimg=10.0, ema_rampup=0.05,
                 augment="auto", seed=0, objective="edm")
#: ``--objective``: what the network learns; the card's ``parameterization.kind`` says which.
OBJECTIVES = ("edm", "flow")


# ----------------------------------------------------------------------------- CLI
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``reconserve train`` (defaults in brackets; ``None`` ones fall back to a saved state)."""
    a = parser.add_argument
    a("--data", default=None, help="darcy | poisson | helmholtz | phantom | PATH to a folder of .npy/.png/.tif [darcy]")
    a("--resolution", type=int, default=None,
      help="grid size N of generated data [64]; for a folder, images are brought to N x N: the centred square "
           "crop (side min(H, W)) of each image, resized with antialiased bilinear interpolation "
           "(without it a folder is used at its native size, all files alike)")
    a("--out", default=None, help="checkpoint folder checkpoints/ID [checkpoints/<data>-<N>]")
    a("--runs-dir", default="runs", help="where runs/<id>/ (state, generated data, log) lives [runs]")
    a("--steps", type=int, default=None, help="total optimizer steps (counting resumed ones) [20000]")
    a("--batch", type=int, default=None, help="batch size [16]")
    a("--lr", type=float, default=None, help="Adam learning rate [2e-4]")
    a("--warmup", type=int, default=None, help="linear learning-rate warm-up steps [500]")
    a("--grad-clip", type=float, default=None, help="gradient-norm clip [1.0]")
    a("--ema-halflife-kimg", type=float, default=None, help="EMA half-life in thousands of images [10]")
    a("--ema-rampup", type=float, default=None, help="EMA half-life ramp-up ratio (EDM) [0.05]")
    a("--num-examples", type=int, default=None, help="examples generated into runs/<id>/data.npy [10000]")
    a("--data-seed", type=int, default=None, help="seed of the generated data [0]")
    a("--base-channels", type=int, default=None, help="UNet base width [32]")
    a("--channel-mult", default=None, help="UNet width per level, e.g. 1,2,2,2 [1,2,2,2]")
    a("--blocks-per-level", type=int, default=None, help="UNet residual blocks per level [1]")
    a("--no-attention", dest="attention", action="store_false", default=None,
      help="no self-attention at the coarsest level")
    a("--objective", choices=OBJECTIVES, default=None,
      help="edm: denoising score matching with EDM preconditioning; flow: flow matching (velocity of the "
           "linear interpolant x_t = (1 - t) x0 + t z), served through the same D(x, sigma) [edm]")
    a("--augment", choices=("auto", "none", "flips", "d4"), default=None,
      help="random symmetries: auto = d4 for PDE data, flips for phantoms, none for folders [auto]")
    a("--save-every", type=int, default=200, help="save state and checkpoint every this many steps [200]")
    a("--log-every", type=int, default=50, help="print a log line every this many steps [50]")
    a("--seed", type=int, default=None, help="training seed (init, batches, noise) [0]")
    a("--device", default="auto", help="cpu | cuda | cuda:N | auto [auto]")
    a("--threads", type=int, default=None, help="torch.set_num_threads (CPU) [torch default]")
    a("--time-limit-min", type=float, default=None, help="stop cleanly (saving) after this many minutes")
    a("--resume", action="store_true", help="continue from runs/<id>/ or checkpoints/<id>/")
    a("--overwrite", action="store_true", help="start afresh even if a state or checkpoint exists")
    a("--description", default=None, help="card description")
    return parser


# ----------------------------------------------------------------------------- helpers
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _mult(v) -> list[int]:
    return [int(t) for t in v.split(",")] if isinstance(v, str) else [int(t) for t in v]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} thread(s), {platform.machine()} {platform.processor()}".strip()


def data_kind(cfg: dict, meta: dict | None) -> str:
    """``darcy``/``poisson``/``helmholtz``/``phantom`` for built-in (or shard-written) data, else ``folder``."""
    if cfg["data"] in D.KINDS:
        return cfg["data"]
    if meta and meta.get("kind") in D.KINDS:
        return meta["kind"]
    return "folder"


def normalization(data: np.ndarray, kind: str) -> tuple[list[float], list[float]]:
    """Per-channel ``shift, scale`` (``x_phys = shift + scale * x_net``) with mean 0 and std 0.5 in network space.

    Darcy's ``a`` in {3, 12} gets ``shift = 7.5, scale = 9`` (``a -> +-0.5``); other channels
    their data-set mean and twice their standard deviation (rounded to 6 digits).
    """
    x = data.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    shift = [_round(m) for m in mean]
    scale = [_round(2 * s) if s > 0 else 1.0 for s in std]
    if kind == "darcy":
        shift[0], scale[0] = (D.DARCY_LOW + D.DARCY_HIGH) / 2, D.DARCY_HIGH - D.DARCY_LOW
    return shift, scale


def _augment_mode(cfg: dict, kind: str) -> str:
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


def parameterization(objective: str) -> dict:
    """The card's ``parameterization`` of a native checkpoint."""
    if objective == "flow":
        return {"kind": "flow", "interpolant": "x_t = (1 - t) x0 + t z, z ~ N(0, I)", "target": "v = z - x0",
                "sigma": "t / (1 - t)", "x": "x_t / (1 - t)", "c_noise": "log(sigma) / 4"}
    return {"kind": "edm", "sigma_data": SIGMA_DATA}


LOSS_TEXT = {"edm": "EDM (P_mean=-1.2, P_std=1.2, sigma_data=0.5)",
             "flow": "flow matching, v = z - x0, unweighted; logit t ~ N(-1.2, 1.2)"}


# ----------------------------------------------------------------------------- data
def load_training_data(cfg: dict, run_dir: Path) -> tuple[np.ndarray, dict | None]:
    """Generated data (cached in ``run_dir/data.npy``, regenerated if absent) or a user folder."""
    if cfg["data"] not in D.KINDS:
        arr = D.load_folder(cfg["data"], cfg["resolution"] if cfg.get("resize") else None)
        return arr, D.load_meta(cfg["data"])
    path, mpath = run_dir / "data.npy", run_dir / "data_meta.json"
    want = {"kind": cfg["data"], "n": cfg["resolution"], "seed": cfg["data_seed"], "count": cfg["num_examples"]}
    if path.exists() and mpath.exists():
        meta = json.loads(mpath.read_text())
        if {k: meta.get(k) for k in want} == want:
            return np.load(path, mmap_mode=None), meta
    _log(f"generating {cfg['num_examples']} {cfg['data']} examples at {cfg['resolution']}x{cfg['resolution']} "
         f"(seed {cfg['data_seed']}) -> {path}")
    t0 = time.time()
    arr, meta = D.generate(cfg["data"], cfg["num_examples"], cfg["resolution"], cfg["data_seed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "data.tmp.npy"
    np.save(tmp, arr)
    tmp.replace(path)
    mpath.write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"generated in {time.time() - t0:.1f} s")
    return arr, meta


# ----------------------------------------------------------------------------- card
def build_card(cfg: dict, kind: str, shape, shift, scale, meta: dict | None, train_info: dict,
               existing: dict | None, folder: dict | None = None) -> dict:
    """The card of a trained model. ``folder`` (user data): ``{"images": bool, "min": float, "max": float}``.

    Image folders (PNG/TIFF) get ``value_range [0, 1]`` (integer images are scaled into it; float
    TIFFs outside it get their data range) and channels ``gray`` or ``r, g, b``; ``.npy`` folders
    their data range. Every new card recommends :data:`models.formats.DEFAULT_METHODS`.
    """
    n = shape[-1]
    grid = {"n": n, "h": 1.0 / (n - 1), "domain": [0, 1]}
    bc = "u=0 on boundary nodes"
    channels = (meta or {}).get("channels")
    pde, value_range = None, None
    if kind == "darcy":
        channels = ["a", "u"]
        pde = {"kind": "darcy", "f": 1.0, "grid": grid, "bc": bc,
               "equation": "-div(a grad u) = f, 5-point finite-volume stencil, arithmetic face averages",
               "a_levels": [D.DARCY_LOW, D.DARCY_HIGH]}
        value_range = {"a": [D.DARCY_LOW, D.DARCY_HIGH]}
        desc = (f"Darcy flow prior on a {n}x{n} node grid: permeability a in {{3, 12}} (thresholded GRF, "
                "alpha=2, tau=3) and pressure u solving -div(a grad u) = 1 with u = 0 on the boundary.")
    elif kind in ("poisson", "helmholtz"):
        channels = ["a", "u"]
        pde = {"kind": kind, "grid": grid, "bc": bc,
               "equation": "laplace(u) = a" if kind == "poisson" else "laplace(u) + k^2 u = a",
               "a_scale": (meta or {}).get("a_scale")}
        if kind == "helmholtz":
            pde["k"] = 1.0
        desc = (f"{kind.capitalize()} prior on a {n}x{n} node grid: source a (GRF alpha=2, tau=3, unit std over "
                f"the training set) and solution u of {pde['equation']} with u = 0 on the boundary.")
    elif kind == "phantom":
        channels = ["intensity"]
        value_range = [0.0, 1.0]
        desc = f"Random Shepp-Logan-like phantoms, {n}x{n}, intensities in [0, 1]."
    else:
        f = folder or {}
        lo, hi = f.get("min"), f.get("max")
        if f.get("images"):
            value_range = [0.0, 1.0] if lo is None or (lo >= 0.0 and hi <= 1.0) else [_round(lo), _round(hi)]
            if not channels and shape[0] in (1, 3):
                channels = ["gray"] if shape[0] == 1 else ["r", "g", "b"]
        elif lo is not None:
            value_range = [_round(lo), _round(hi)]
        how = (f"brought to {shape[-2]}x{shape[-1]} ({D.RESIZE_RULE})" if cfg.get("resize")
               else f"at their native size {shape[-2]}x{shape[-1]}")
        desc = (f"Prior trained on the {'images' if f.get('images') else 'arrays'} in {cfg['data']}, {how}; "
                f"values in {value_range}.")
    if not channels or len(channels) != shape[0]:
        channels = ["intensity"] if shape[0] == 1 else [f"c{i}" for i in range(shape[0])]
    if cfg.get("objective", "edm") == "flow":
        desc += (" A flow-matching network (velocity of x_t = (1 - t) x0 + t z) served as the denoiser "
                 "D(x, sigma) through x0 = x_t - t v, sigma = t / (1 - t).")
    card = {
        "id": cfg["id"],
        "kind": "pde" if pde else "image",
        "shape": list(shape),
        "channels": channels,
        "architecture": {"name": "unet", "args": arch_args(cfg, shape[0])},
        "parameterization": parameterization(cfg.get("objective", "edm")),
        "sigma_min": SIGMA_MIN,
        "sigma_max": SIGMA_MAX,
        "normalization": {"shift": list(shift), "scale": list(scale),
                          "meaning": "x_phys = shift + scale * x_net (per channel)"},
        "pde": pde,
        "value_range": value_range,
        "description": cfg.get("description") or desc,
        "training": train_info,
        "methods": [dict(m) for m in DEFAULT_METHODS],
    }
    if existing:  # keep what others added (recommended methods, validation, ...)
        for k, v in existing.items():
            if k == "methods" and not v:  # an empty list (older cards): the default stays
                continue
            if k not in card or k in ("methods", "validation"):
                card[k] = v
        if cfg.get("description") is None and existing.get("description"):
            card["description"] = existing["description"]
    return card


def arch_args(cfg: dict, channels: int) -> dict:
    return {"in_channels": channels, "out_channels": channels, "base": cfg["base_channels"],
            "channel_mult": _mult(cfg["channel_mult"]), "blocks_per_level": cfg["blocks_per_level"],
            "attention": bool(cfg["attention"])}


# ----------------------------------------------------------------------------- state
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
        self.started = _now()

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
                "started": self.started, "updated": _now(), "history": self.history}

    def load_scalars(self, s: dict) -> None:
        self.step, self.loss_ema = int(s["step"]), s.get("loss_ema")
        self.wall_time, self.started = float(s.get("wall_time_s", 0.0)), s.get("started", _now())
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


def _state_json(tr: Trainer, cfg: dict, extra: dict) -> dict:
    return {**tr.scalars(), "config": cfg, **extra, "torch": torch.__version__}


def _read_runs_state(run_dir: Path):
    tj, ts = run_dir / STATE_JSON, run_dir / STATE_TENSORS
    if tj.exists() and ts.exists():
        return json.loads(tj.read_text()), ts
    return None


def _read_resume_state(ckpt: Path):
    p = ckpt / RESUME
    if p.exists():
        with safe_open(str(p), "pt") as f:
            md = f.metadata() or {}
        if "state" in md:
            return json.loads(md["state"]), p
    return None


# ----------------------------------------------------------------------------- main
def _resolve_config(args: argparse.Namespace, saved: dict | None) -> dict:
    cfg = {}
    if saved is not None:  # runs from before --objective existed are EDM runs
        saved = {"objective": "edm", **saved}
    for k, default in _DEFAULTS.items():
        v = getattr(args, k, None)
        if saved is not None and k in saved:
            if k in _STRUCTURAL and v is not None and _norm_cfg(k, v) != _norm_cfg(k, saved[k]):
                raise SystemExit(f"--{k.replace('_', '-')} {v!r} differs from the run being resumed "
                                 f"({saved[k]!r}); use --overwrite or a new --out")
            cfg[k] = saved[k] if (v is None or k in _STRUCTURAL) else v
        else:
            cfg[k] = default if v is None else v
    cfg["channel_mult"] = ",".join(str(m) for m in _mult(cfg["channel_mult"]))
    cfg["description"] = args.description if args.description is not None else (saved or {}).get("description")
    return cfg


def _norm_cfg(k, v):
    return ",".join(str(m) for m in _mult(v)) if k == "channel_mult" else v


def run_train(args: argparse.Namespace) -> Path:
    """Train (or resume) and export ``checkpoints/<id>``; returns the checkpoint folder."""
    t_session = time.time()
    data_arg = args.data or _DEFAULTS["data"]
    res = args.resolution or _DEFAULTS["resolution"]
    ckpt = Path(args.out) if args.out else Path("checkpoints") / f"{Path(data_arg).name}-{res}"
    run_id = ckpt.name
    run_dir = Path(args.runs_dir) / run_id
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)

    # --- what to resume from: runs/<id>/state.* or checkpoints/<id>/resume.safetensors (newest), else weights
    source = None
    if args.resume and not args.overwrite:
        cands = [c for c in (_read_runs_state(run_dir), _read_resume_state(ckpt)) if c is not None]
        if cands:
            source = max(cands, key=lambda c: c[0]["step"])  # runs/ wins a tie (listed first)
        elif (ckpt / WEIGHTS).exists() and (ckpt / CARD).exists():
            source = "weights"
        else:
            _log(f"--resume: nothing to resume in {run_dir} or {ckpt}; starting afresh")
    elif not args.overwrite and ((run_dir / STATE_JSON).exists() or (ckpt / WEIGHTS).exists()):
        raise SystemExit(f"{run_dir} or {ckpt} already holds a run; pass --resume to continue or --overwrite")

    saved_cfg = None
    old_card = json.loads((ckpt / CARD).read_text()) if (ckpt / CARD).exists() else None
    if isinstance(source, tuple):
        saved_cfg = source[0]["config"]
    elif source == "weights":
        tr_old = old_card.get("training") or {}
        saved_cfg = tr_old.get("config")
        if saved_cfg is None:
            a = old_card["architecture"]["args"]
            saved_cfg = {"data": tr_old.get("data", data_arg), "resolution": old_card["shape"][-1],
                         "base_channels": a["base"], "channel_mult": a["channel_mult"],
                         "blocks_per_level": a.get("blocks_per_level", 1), "attention": a.get("attention", True),
                         "objective": old_card["parameterization"].get("kind", "edm")}
    cfg = _resolve_config(args, saved_cfg)
    cfg["id"] = run_id
    if cfg["data"] not in D.KINDS:  # a folder: --resolution crops and resizes (remembered for --resume)
        cfg["resize"] = (bool(saved_cfg["resize"]) if saved_cfg is not None and "resize" in saved_cfg
                         else args.resolution is not None)

    # --- data, normalization
    data, meta = load_training_data(cfg, run_dir)
    kind = data_kind(cfg, meta)
    folder_info = None
    if cfg["data"] not in D.KINDS:
        cfg["resolution"] = int(data.shape[-1])
        folder_info = {"images": D.is_image_folder(cfg["data"]), "min": float(data.min()), "max": float(data.max())}
    shape = tuple(int(s) for s in data.shape[1:])
    if isinstance(source, tuple) and "normalization" in source[0]:
        shift, scale = source[0]["normalization"]["shift"], source[0]["normalization"]["scale"]
    else:
        shift, scale = normalization(data, kind)
    sh = torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1)
    sc = torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1)
    x_all = ((torch.from_numpy(np.ascontiguousarray(data)) - sh) / sc).to(device)
    del data
    aug = _augment_mode(cfg, kind)

    tr = Trainer(cfg, shape, device)
    if isinstance(source, tuple):
        st, path = source
        tr.unpack(load_file(str(path), device="cpu"))
        tr.load_scalars(st)
        _log(f"resumed from {path} at step {tr.step}")
    elif source == "weights":
        w = load_file(str(ckpt / WEIGHTS), device="cpu")
        tr.net.load_state_dict(w)
        tr.ema.load_state_dict(w)
        t_old = old_card.get("training") or {}
        tr.step = int(t_old.get("steps", 0))
        tr.wall_time = float(t_old.get("wall_time_s", 0.0))
        tr.loss_ema = t_old.get("final_loss")
        tr.started = t_old.get("started", tr.started)
        _log(f"resumed from {ckpt / WEIGHTS} (EMA weights only, fresh optimizer) at step {tr.step}")
    n_params = sum(p.numel() for p in tr.net.parameters())
    _log(f"{run_id}: data {cfg['data']} {list(x_all.shape)} kind {kind}, UNet {n_params} parameters, "
         f"device {device}, threads {torch.get_num_threads()}, augment {aug}, "
         f"normalization shift {shift} scale {scale}")

    data_info = {"data": cfg["data"], "data_seed": cfg["data_seed"] if cfg["data"] in D.KINDS else None,
                 "num_examples": int(x_all.shape[0])}
    if folder_info is not None:
        data_info["preprocessing"] = (f"{D.RESIZE_RULE}, N = {cfg['resolution']}" if cfg.get("resize")
                                      else "none: native size")
    extra = {"normalization": {"shift": shift, "scale": scale}, "data_meta": meta, "kind": kind,
             "augment": aug}
    hardware = _hardware(device)
    t_mark = [time.time()]

    def save(final: bool = False) -> None:
        now = time.time()
        tr.wall_time += now - t_mark[0]
        t_mark[0] = now
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        tensors = tr.pack()
        sj = _state_json(tr, cfg, extra)
        for dst, md in ((run_dir / STATE_TENSORS, None), (ckpt / RESUME, {"state": json.dumps(sj)})):
            save_tensors(tensors, dst, md)
        tmp = run_dir / (STATE_JSON + ".tmp")
        tmp.write_text(json.dumps(sj, indent=1) + "\n")
        tmp.replace(run_dir / STATE_JSON)
        existing = json.loads((ckpt / CARD).read_text()) if (ckpt / CARD).exists() else None
        train_info = {**data_info, "steps": tr.step, "batch": cfg["batch"], "lr": cfg["lr"],
                      "warmup": cfg["warmup"], "grad_clip": cfg["grad_clip"],
                      "ema_halflife_kimg": cfg["ema_halflife_kimg"], "ema_rampup": cfg["ema_rampup"],
                      "augment": aug, "loss": LOSS_TEXT[cfg.get("objective", "edm")],
                      "seed": cfg["seed"], "wall_time_s": round(tr.wall_time, 1), "hardware": hardware,
                      "final_loss": tr.loss_ema, "started": tr.started, "updated": _now(),
                      "parameters": n_params, "config": cfg}
        card = build_card(cfg, kind, shape, shift, scale, meta, train_info, existing, folder_info)
        save_checkpoint(ckpt, tr.ema, card)

    # --- stop on SIGINT / SIGTERM: finish the step, save, return
    stop = {"why": None}

    def _handler(signum, frame):
        stop["why"] = signal.Signals(signum).name

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread
            pass

    limit_s = args.time_limit_min * 60 if args.time_limit_min else math.inf
    try:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg["steps"], initial=tr.step, desc=run_id, dynamic_ncols=True, leave=tty,
                   mininterval=0.5 if tty else 60.0, file=sys.stderr)
        acc, acc_n, t_log = 0.0, 0, time.time()
        tr.net.train()
        while tr.step < cfg["steps"]:
            loss = tr.train_step(x_all, aug)
            acc, acc_n = acc + loss, acc_n + 1
            bar.update(1)
            if tr.step % args.log_every == 0 or tr.step == cfg["steps"]:
                dt = (time.time() - t_log) / acc_n
                tr.history.append([tr.step, acc / acc_n, tr.loss_ema])
                bar.set_postfix(loss=f"{tr.loss_ema:.4f}", refresh=False)
                _log(f"step {tr.step}/{cfg['steps']} loss {acc / acc_n:.4f} ema {tr.loss_ema:.4f} "
                     f"lr {tr.lr():.2e} {dt:.3f} s/step elapsed {(time.time() - t_session) / 60:.1f} min")
                acc, acc_n, t_log = 0.0, 0, time.time()
            if stop["why"] or time.time() - t_session > limit_s:
                break
            if args.save_every and tr.step % args.save_every == 0:
                save()
        bar.close()
        why = stop["why"] or ("time limit" if time.time() - t_session > limit_s else "done")
        save(final=True)
        _log(f"saved {ckpt} at step {tr.step} ({why}); loss ema {tr.loss_ema}; "
             f"wall time {tr.wall_time / 60:.1f} min in all")
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    return ckpt


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    return run_train(add_train_arguments(p).parse_args(argv))


if __name__ == "__main__":
    main()
