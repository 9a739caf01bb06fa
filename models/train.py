"""Train an EDM denoiser (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Denoising score matching with EDM's preconditioning (``EDMPrecond(UNet)``), or flow matching
(``--objective flow``): the losses and the optimizer state are in :mod:`models.trainer`, the card
in :mod:`models.train_card`, the arguments in :mod:`models.cli_args`; this module runs a session.

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
import json
import math
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import data as D
from .card import CARD, WEIGHTS, save_checkpoint, save_tensors, utc_now
from .cli_args import add_train_arguments
from .train_card import LOSS_TEXT, build_card, data_kind, normalization
from .trainer import Trainer, augment_mode, parse_mult

__all__ = ["add_train_arguments", "load_training_data", "run_train", "main"]

STATE_TENSORS, STATE_JSON, RESUME = "state.safetensors", "state.json", "resume.safetensors"

# Settings that define the model and its data: taken from the saved state on --resume.
_STRUCTURAL = ("objective", "data", "resolution", "num_examples", "data_seed", "base_channels", "channel_mult",
               "blocks_per_level", "attention")
_DEFAULTS = dict(data="darcy", resolution=64, num_examples=10000, data_seed=0, base_channels=32,
                 channel_mult="1,2,2,2", blocks_per_level=1, attention=True, steps=20000, batch=16,
                 lr=2e-4, warmup=500, grad_clip=1.0, ema_halflife_kimg=10.0, ema_rampup=0.05,
                 augment="auto", seed=0, objective="edm")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} thread(s), {platform.machine()} {platform.processor()}".strip()


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


# ----------------------------------------------------------------------------- state
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


# ----------------------------------------------------------------------------- config
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
    cfg["channel_mult"] = ",".join(str(m) for m in parse_mult(cfg["channel_mult"]))
    cfg["description"] = args.description if args.description is not None else (saved or {}).get("description")
    return cfg


def _norm_cfg(k, v):
    return ",".join(str(m) for m in parse_mult(v)) if k == "channel_mult" else v



def _resume_source(args: argparse.Namespace, run_dir: Path, ckpt: Path):
    """What ``--resume`` continues from: ``(state, path)`` of the newest of ``runs/<id>/state.*`` and
    ``checkpoints/<id>/resume.safetensors``, ``"weights"`` (a bare checkpoint), or ``None`` (afresh)."""
    if args.resume and not args.overwrite:
        cands = [c for c in (_read_runs_state(run_dir), _read_resume_state(ckpt)) if c is not None]
        if cands:
            return max(cands, key=lambda c: c[0]["step"])  # runs/ wins a tie (listed first)
        if (ckpt / WEIGHTS).exists() and (ckpt / CARD).exists():
            return "weights"
        _log(f"--resume: nothing to resume in {run_dir} or {ckpt}; starting afresh")
    elif not args.overwrite and ((run_dir / STATE_JSON).exists() or (ckpt / WEIGHTS).exists()):
        raise SystemExit(f"{run_dir} or {ckpt} already holds a run; pass --resume to continue or --overwrite")
    return None


def _saved_config(source, old_card: dict | None, data_arg: str) -> dict | None:
    """The config of the run being resumed (rebuilt from the card for a bare checkpoint)."""
    if isinstance(source, tuple):
        return source[0]["config"]
    if source != "weights":
        return None
    tr_old = old_card.get("training") or {}
    if tr_old.get("config") is not None:
        return tr_old["config"]
    a = old_card["architecture"]["args"]
    return {"data": tr_old.get("data", data_arg), "resolution": old_card["shape"][-1],
            "base_channels": a["base"], "channel_mult": a["channel_mult"],
            "blocks_per_level": a.get("blocks_per_level", 1), "attention": a.get("attention", True),
            "objective": old_card["parameterization"].get("kind", "edm")}


@dataclass
class _Data:
    """The training set in network space and what the card says of it."""

    x_all: torch.Tensor
    meta: dict | None
    kind: str
    shape: tuple
    shift: list
    scale: list
    folder_info: dict | None


def _prepare_data(cfg: dict, run_dir: Path, source, device: torch.device) -> _Data:
    """Load (or generate) the data and normalize it: ``x_net = (x_phys - shift) / scale``."""
    data, meta = load_training_data(cfg, run_dir)
    kind = data_kind(cfg, meta)
    folder_info = None
    if cfg["data"] not in D.KINDS:
        cfg["resolution"] = int(data.shape[-1])
        folder_info = {"images": D.is_image_folder(cfg["data"]), "min": float(data.min()), "max": float(data.max())}
    if isinstance(source, tuple) and "normalization" in source[0]:
        shift, scale = source[0]["normalization"]["shift"], source[0]["normalization"]["scale"]
    else:
        shift, scale = normalization(data, kind)
    sh = torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1)
    sc = torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1)
    x_all = ((torch.from_numpy(np.ascontiguousarray(data)) - sh) / sc).to(device)
    return _Data(x_all, meta, kind, tuple(int(s) for s in data.shape[1:]), shift, scale, folder_info)


def _restore(tr: Trainer, source, ckpt: Path, old_card: dict | None) -> None:
    """Load the resumed state into ``tr``: the full state, or a bare checkpoint's EMA weights."""
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


class _Saver:
    """Writes the state (``runs/<id>/``, ``checkpoints/<id>/resume.safetensors``) and the EMA checkpoint."""

    def __init__(self, tr: Trainer, cfg: dict, data: _Data, aug: str, run_dir: Path, ckpt: Path,
                 device: torch.device):
        self.tr, self.cfg, self.data, self.run_dir, self.ckpt = tr, cfg, data, run_dir, ckpt
        self.extra = {"normalization": {"shift": data.shift, "scale": data.scale}, "data_meta": data.meta,
                      "kind": data.kind, "augment": aug}
        info = {"data": cfg["data"], "data_seed": cfg["data_seed"] if cfg["data"] in D.KINDS else None,
                "num_examples": int(data.x_all.shape[0])}
        if data.folder_info is not None:
            info["preprocessing"] = (f"{D.RESIZE_RULE}, N = {cfg['resolution']}" if cfg.get("resize")
                                     else "none: native size")
        self.data_info, self.aug, self.hardware = info, aug, _hardware(device)
        self.n_params = sum(p.numel() for p in tr.net.parameters())
        self.t_mark = time.time()

    def train_info(self) -> dict:
        tr, cfg = self.tr, self.cfg
        return {**self.data_info, "steps": tr.step, "batch": cfg["batch"], "lr": cfg["lr"],
                "warmup": cfg["warmup"], "grad_clip": cfg["grad_clip"],
                "ema_halflife_kimg": cfg["ema_halflife_kimg"], "ema_rampup": cfg["ema_rampup"],
                "augment": self.aug, "loss": LOSS_TEXT[cfg.get("objective", "edm")],
                "seed": cfg["seed"], "wall_time_s": round(tr.wall_time, 1), "hardware": self.hardware,
                "final_loss": tr.loss_ema, "started": tr.started, "updated": utc_now(),
                "parameters": self.n_params, "config": cfg}

    def __call__(self) -> None:
        tr, run_dir, ckpt = self.tr, self.run_dir, self.ckpt
        now = time.time()
        tr.wall_time += now - self.t_mark
        self.t_mark = now
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        tensors = tr.pack()
        sj = _state_json(tr, self.cfg, self.extra)
        for dst, md in ((run_dir / STATE_TENSORS, None), (ckpt / RESUME, {"state": json.dumps(sj)})):
            save_tensors(tensors, dst, md)
        tmp = run_dir / (STATE_JSON + ".tmp")
        tmp.write_text(json.dumps(sj, indent=1) + "\n")
        tmp.replace(run_dir / STATE_JSON)
        existing = json.loads((ckpt / CARD).read_text()) if (ckpt / CARD).exists() else None
        d = self.data
        card = build_card(self.cfg, d.kind, d.shape, d.shift, d.scale, d.meta, self.train_info(), existing,
                          d.folder_info)
        save_checkpoint(ckpt, tr.ema, card)


@contextmanager
def _stop_on_signals():
    """``stop["why"]`` becomes the signal's name on SIGINT / SIGTERM (the loop finishes its step,
    saves and returns); the previous handlers come back on exit."""
    stop = {"why": None}

    def _handler(signum, frame):
        stop["why"] = signal.Signals(signum).name

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield stop
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)


def _train_loop(tr: Trainer, x_all: torch.Tensor, aug: str, args: argparse.Namespace, save: _Saver,
                stop: dict, t_session: float, run_id: str) -> str:
    """Steps up to ``cfg["steps"]`` with logs and periodic saves; returns why it ended."""
    from tqdm import tqdm

    cfg = tr.cfg
    limit_s = args.time_limit_min * 60 if args.time_limit_min else math.inf
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
    return stop["why"] or ("time limit" if time.time() - t_session > limit_s else "done")


# ----------------------------------------------------------------------------- main
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

    source = _resume_source(args, run_dir, ckpt)
    old_card = json.loads((ckpt / CARD).read_text()) if (ckpt / CARD).exists() else None
    saved_cfg = _saved_config(source, old_card, data_arg)
    cfg = _resolve_config(args, saved_cfg)
    cfg["id"] = run_id
    if cfg["data"] not in D.KINDS:  # a folder: --resolution crops and resizes (remembered for --resume)
        cfg["resize"] = (bool(saved_cfg["resize"]) if saved_cfg is not None and "resize" in saved_cfg
                         else args.resolution is not None)
    data = _prepare_data(cfg, run_dir, source, device)
    aug = augment_mode(cfg, data.kind)
    tr = Trainer(cfg, data.shape, device)
    _restore(tr, source, ckpt, old_card)
    save = _Saver(tr, cfg, data, aug, run_dir, ckpt, device)
    _log(f"{run_id}: data {cfg['data']} {list(data.x_all.shape)} kind {data.kind}, "
         f"UNet {save.n_params} parameters, device {device}, threads {torch.get_num_threads()}, augment {aug}, "
         f"normalization shift {data.shift} scale {data.scale}")
    with _stop_on_signals() as stop:
        why = _train_loop(tr, data.x_all, aug, args, save, stop, t_session, run_id)
        save()
    _log(f"saved {ckpt} at step {tr.step} ({why}); loss ema {tr.loss_ema}; "
         f"wall time {tr.wall_time / 60:.1f} min in all")
    return ckpt


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    return run_train(add_train_arguments(p).parse_args(argv))


if __name__ == "__main__":
    main()
