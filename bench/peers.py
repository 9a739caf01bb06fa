"""deepinv 0.5's diffusion solvers driven by our phantom-64 prior, side by side with ours.

    .venv/bin/python bench/peers.py --smoke                 # 2 cases, 2 steps per method: seconds
    .venv/bin/python bench/peers.py --tune                  # grids on the tuning cases -> bench/results/peers-tune.json
    .venv/bin/python bench/peers.py --tune --append --methods dinv_pigdm --grid '{"dinv_pigdm": {"weight": [10, 30]}}'
                                                            # extend a grid whose best lies on its edge
    .venv/bin/python bench/peers.py --cases 3               # the bench -> bench/results/peers-phantom-64.json,
                                                            #   docs/benchmarks/peers-<task>.png
    .venv/bin/python bench/peers.py --append --methods '' --fast-steps '' --ours-dps-steps 1000
                                                            # add points to an earlier run (same cases)
    .venv/bin/python bench/peers.py --report                # tables, plots and comparisons from the JSON again

The adapter (``DeepinvDenoiser``) exposes our ``D(x, sigma)`` (network space, the card's
normalization ``x_phys = shift + scale * x_net``) as a ``deepinv.models.Denoiser``: images in
[0, 1] (the card's ``value_range`` mapped onto [0, 1]; for phantom-64 that is the physical
range itself) and ``sigma`` in the same units, so ``sigma_net = sigma * (hi - lo) / scale``,
floored at the card's ``sigma_min`` (DDRM's schedule ends at sigma = 0, where the EDM
preconditioning would take log 0). It counts its calls and the backprops through it.

Peers (deepinv 0.5.0's own classes, run as shipped):

* ``dinv_dps``: ``deepinv.sampling.DPS`` (VP schedule, DDPM solver, ``guidance="norm"``), ``weight``
  tuned; ``num_steps = n`` makes ``n - 1`` network calls, each with one backprop;
* ``dinv_diffpir``: ``deepinv.sampling.DiffPIR`` with ``data_fidelity=L2()``, ``sigma`` passed
  explicitly, ``lambda_`` and ``zeta`` tuned; ``max_iter`` network calls (the last one's output
  is discarded by deepinv), no backprop;
* ``dinv_ddrm``: ``deepinv.sampling.DDRM`` with ``sigmas = linspace(1, 0, n)`` (its default shape),
  ``eta`` and ``etab`` tuned; ``n`` network calls, no backprop. Super-resolution uses
  ``BlockMeanSR`` below (deepinv's ``Downsampling`` is not a ``DecomposablePhysics``);
* ``dinv_pigdm``: ``PosteriorDiffusion`` with ``PiGDMDataFidelity`` (pseudo-inverse guidance,
  Song et al. 2023; VP schedule, DDPM solver, as ``DPS``), ``weight`` tuned; one backprop per call;
* ``dinv_mm``: ``PosteriorDiffusion`` with ``MomentMatchingDataFidelity`` (Rozet et al. 2024: the
  Tweedie covariance ``sigma^2 J`` solved by conjugate gradients, the closest relative of our
  ``fast``), ``weight`` tuned, ``cg_max_iter`` 3 (deepinv's default); up to 5 backprops per call (the CG's
  initial residual, 3 iterations, the final gradient).

Ours: ``fast`` (``lam`` and ``cg_iters`` from bench/results/phantom-64-tune.json, at several
step counts, with ``cg_iters`` 1 and the tuned value) and ``dps`` (the card's ``zeta``, 1000 steps)
through ``bench.common.run_samples``, exactly as bench/phantom_tasks.py runs them; and
``fast_prox``: ``fast`` with ``cg_iters`` 0 (only the closed-form proximal data step of the linear
operator: one network call a step and no backprop, the cost of a DiffPIR or DDRM step), its
``lam``, ``eta`` (100 = fresh noise at every step, DiffPIR's ``zeta`` 1) and ``schedule`` tuned
on the tuning cases like a peer's (``--tune --methods fast_prox``).

Equal time, side by side in one run (the zero-backprop methods and the cheap ``fast`` points)::

    .venv/bin/python bench/peers.py --cases 3 --methods dinv_diffpir,dinv_ddrm,fast_prox \
        --fast-steps 10,20 --ours-dps-steps '' --out bench/results/peers-phantom-64-equal-time.json \
        --plots docs/benchmarks/equal-time

Cases and seeds: the held-out phantoms and observations of bench/phantom_tasks.py (``observe``:
same noise per case, sigma 0.02); tuning on ``TUNE_SEED`` cases with the observation seeds of
``phantom_tasks.py --tune``. Every method runs all cases of a task as one batch, one sample per
case; ours seed case ``i`` with ``i`` (one stream per case), the deepinv solvers draw from one
generator seeded with 0 (DPS, PiGDM, MM: their ``rng``; DiffPIR and DDRM draw from torch's
global generator, seeded with 0 right before each run). PSNR (data range 1) and SSIM of the
sample clipped to [0, 1]; seconds per image = wall time of the batch / cases (``cpu_s`` the
process CPU time, less sensitive to other processes on a shared machine). Tuned parameters are
tuned at one step count (``TUNE_STEPS``) and used at every step count.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deepinv as dinv  # noqa: E402

from bench.common import (repo_path, HELD_OUT_SEED, OBS_SEED, RESULTS, TUNE_SEED, atomic_write_json, environment,  # noqa: E402
                          held_out_phantoms, run_samples, set_threads)
from bench.phantom_tasks import NOISE, SHAPE, TASKS, classical_baseline, observe, psnrs, task_spec  # noqa: E402
from models.checkpoint import LoadedModel, load_checkpoint  # noqa: E402
from models.denoiser import Denoiser as OurDenoiser  # noqa: E402
from operators.blur import gaussian_kernel  # noqa: E402

MODEL = "phantom-64"
OUT = RESULTS / f"peers-{MODEL}.json"
TUNE_OUT = RESULTS / "peers-tune.json"
FAST_TUNED = RESULTS / f"{MODEL}-tune.json"
PLOTS = ROOT / "docs" / "benchmarks"

#: The notes' working DPS weights per task (guidance "norm"); the tuning grid is x 1/3, 1, 3.
DPS_WEIGHT = {"box_inpainting": 100.0, "random_inpainting": 300.0, "deblur": 1000.0, "sr4": 1000.0}
#: Grids on the tuning cases (``weight`` of dps is relative to DPS_WEIGHT), at TUNE_STEPS steps.
TUNE_GRID = {
    "dinv_dps": {"weight_x": [1 / 3, 1.0, 3.0]},
    "dinv_diffpir": {"lambda_": [0.3, 1.0, 3.0], "zeta": [0.3, 1.0]},
    "dinv_ddrm": {"eta": [0.5, 0.85, 1.0], "etab": [0.7, 1.0]},
    "dinv_pigdm": {"weight": [0.3, 1.0, 3.0]},
    "dinv_mm": {"weight": [0.3, 1.0, 3.0]},
    "fast_prox": {"lam": [1.0, 3.0, 10.0], "eta": [1.0, 100.0], "schedule": ["karras", "vp_cosine"]},
}
TUNE_STEPS = {"dinv_dps": 100, "dinv_diffpir": 50, "dinv_ddrm": 50, "dinv_pigdm": 50, "dinv_mm": 20, "fast_prox": 50}
#: Defaults where nothing was tuned (deepinv's own, DPS: the notes' weight).
PEER_DEFAULTS = {"dinv_dps": {"weight_x": 1.0}, "dinv_diffpir": {"lambda_": 7.0, "zeta": 0.1},
                 "dinv_ddrm": {"eta": 0.85, "etab": 1.0}, "dinv_pigdm": {"weight": 1.0}, "dinv_mm": {"weight": 1.0},
                 "fast_prox": {"lam": 1.0, "eta": 1.0, "schedule": "karras"}}
PEER_LABELS = {"dinv_dps": "DPS (deepinv)", "dinv_diffpir": "DiffPIR (deepinv)", "dinv_ddrm": "DDRM (deepinv)",
               "dinv_pigdm": "PiGDM (deepinv)", "dinv_mm": "MomentMatching (deepinv)",
               "fast_prox": "fast (cg_iters 0: closed-form data step, no backprop)"}
#: Our own settings run like the peers (tuned by --tune, a series per step list): method, fixed params.
OURS = {"fast": ("fast", {}), "dps": ("dps", {}), "fast_prox": ("fast", {"cg_iters": 0})}
#: The points of the bench: series label -> (method, steps list); ``fast`` series are filled per task.
PEER_STEPS = {"dinv_diffpir": [10, 20, 50, 100], "dinv_ddrm": [10, 20, 50, 100], "dinv_dps": [100, 250, 1000],
              "dinv_pigdm": [20, 50, 100], "dinv_mm": [10, 20, 50], "fast_prox": [10, 20, 50, 100]}
FAST_STEPS = [10, 20, 30, 50]
OURS_DPS_STEPS = [1000]
SMOKE_STEPS = 2


# ----------------------------------------------------------------------------- counting
class CallCounter:
    """Network calls (one per batched call) and backprops through the network."""

    def __init__(self):
        self.calls = 0
        self.backprops = 0

    def reset(self) -> None:
        self.calls = self.backprops = 0


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts one backprop (also under ``torch.func.vjp``)."""

    @staticmethod
    def forward(x, counter):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]

    @staticmethod
    def backward(ctx, g):
        ctx.counter.backprops += 1
        return g, None


def _counted(out: torch.Tensor, counter: CallCounter | None) -> torch.Tensor:
    return out if counter is None else _CountBackward.apply(out, counter)


# ----------------------------------------------------------------------------- the adapter
class DeepinvDenoiser(dinv.models.Denoiser):
    """Our ``D(x, sigma)`` as a ``deepinv.models.Denoiser``: ``x`` in [0, 1], ``sigma`` in the same units.

    The card's ``value_range [lo, hi]`` is mapped onto [0, 1] (``x_phys = lo + (hi - lo) x``; phantom-64:
    [0, 1], the identity) and the normalization ``x_phys = shift + scale * x_net`` onto network space, so
    ``x_net = a x + b`` per channel with ``a = (hi - lo) / scale`` and ``sigma_net = a sigma`` (one ``a``
    for every channel, else a scalar sigma has no meaning). ``sigma_net`` is floored at the card's
    ``sigma_min``. The network's preconditioning runs in float64 (as in our samplers); the output
    comes back in ``x``'s dtype. ``sigma``: a float, a 0-d tensor or one value per batch item.
    """

    def __init__(self, model: LoadedModel, counter: CallCounter | None = None):
        super().__init__()
        self.inner = model.denoiser
        card = model.card
        lo, hi = (card.get("value_range") or [0.0, 1.0])[:2]
        shift, scale = model.shift, model.scale
        if not torch.all(scale == scale[0]):
            raise ValueError(f"{card['id']}: channels have different scales; one sigma cannot serve them all")
        c = len(scale)
        self.lo, self.span = float(lo), float(hi) - float(lo)
        self.register_buffer("shift", shift.reshape(1, c, 1, 1), persistent=False)
        self.register_buffer("scale", scale.reshape(1, c, 1, 1), persistent=False)
        self.sigma_min = float(self.inner.sigma_min)
        self.counter = counter

    def net_sigma(self, sigma, batch: int) -> torch.Tensor:
        """``sigma`` (deepinv units) as the network's ``[B]`` float64 sigma, floored at ``sigma_min``."""
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().to("cpu").flatten()
        if s.numel() == 1:
            s = s.expand(batch)
        elif s.numel() != batch:
            raise ValueError(f"sigma has {s.numel()} values for a batch of {batch}")
        return (s * self.span / float(self.scale.flatten()[0])).clamp_min(self.sigma_min)

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        if self.counter is not None:
            self.counter.calls += 1
        s = self.net_sigma(sigma, x.shape[0]).to(x.device)
        shift, scale = self.shift.to(x.device), self.scale.to(x.device)
        x_phys = self.lo + self.span * x.to(torch.float64)
        d = self.inner((x_phys - shift) / scale, s)
        out = ((shift + scale * d - self.lo) / self.span).to(x.dtype)
        return _counted(out, self.counter)


class BackpropCountingDenoiser(OurDenoiser):
    """Our denoiser with its backprops counted (our samplers count the calls themselves)."""

    def __init__(self, inner: OurDenoiser, counter: CallCounter):
        super().__init__()
        self.inner, self.counter = inner, counter
        self.shape, self.sigma_min = inner.shape, inner.sigma_min
        self.sigma_max, self.sigma_data = inner.sigma_max, inner.sigma_data

    def forward(self, x, sigma):
        return _counted(self.inner(x, sigma), self.counter)


# ----------------------------------------------------------------------------- deepinv's operators
def walsh_hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal (Sylvester) Walsh-Hadamard matrix of size ``n`` (a power of 2); row 0 constant."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"{n} is not a power of 2")
    return h / math.sqrt(n)


class BlockMeanSR(dinv.physics.DecomposablePhysics):
    """Our super-resolution (mean over each ``f x f`` block) with its exact SVD, for DDRM.

    ``V^T``: an orthonormal 2-D Walsh-Hadamard transform of each block, coefficient ``(k, l)`` of
    block ``(i, j)`` at pixel ``(f i + k, f j + l)``; singular value ``1 / f`` on each block's DC
    coefficient (``sum / f``), 0 elsewhere; ``U`` reads the DC coefficients (``U U^T = I``).
    """

    def __init__(self, img_size, factor: int, dtype=torch.float32, **kwargs):
        c, h, w = img_size
        f = int(factor)
        if h % f or w % f:
            raise ValueError(f"factor {f} does not divide {h}x{w}")
        mask = torch.zeros(1, c, h, w, dtype=dtype)
        mask[..., ::f, ::f] = 1.0 / f
        super().__init__(mask=mask, img_size=tuple(img_size), **kwargs)
        self.factor = f
        self.register_buffer("hadamard", walsh_hadamard(f, dtype))

    def _blocks(self, x, transform):
        b, c, h, w = x.shape
        f = self.factor
        xb = x.reshape(b, c, h // f, f, w // f, f)
        hm = self.hadamard.to(x)
        yb = torch.einsum("kp,bcipjq,lq->bcikjl", transform(hm), xb, transform(hm))
        return yb.reshape(b, c, h, w)

    def V_adjoint(self, x):
        return self._blocks(x, lambda m: m)

    def V(self, x):
        return self._blocks(x, lambda m: m.T)

    def U(self, x):
        return x[..., ::self.factor, ::self.factor]

    def U_adjoint(self, y):
        b, c, h, w = y.shape
        f = self.factor
        out = y.new_zeros(b, c, h * f, w * f)
        out[..., ::f, ::f] = y
        return out


def deepinv_physics(task: str, dtype=torch.float32, noise: float = NOISE):
    """deepinv's forward operator for one of our tasks (``Inpainting``, ``BlurFFT``, ``BlockMeanSR``),
    with ``GaussianNoise(noise)`` as its noise model (the solvers read sigma from it; it never draws)."""
    spec = task_spec(task)
    nm = dinv.physics.GaussianNoise(sigma=noise)
    if spec["kind"] == "inpainting":
        mask = torch.as_tensor(spec["mask"], dtype=dtype)[None]
        return dinv.physics.Inpainting(img_size=SHAPE, mask=mask, noise_model=nm)
    if spec["kind"] == "blur":
        g = spec["gaussian"]
        k = torch.as_tensor(gaussian_kernel(g["sigma"], g["size"]), dtype=dtype)[None, None]
        return dinv.physics.BlurFFT(img_size=SHAPE, filter=k, noise_model=nm)
    return BlockMeanSR(SHAPE, spec["factor"], dtype=dtype, noise_model=nm)


# ----------------------------------------------------------------------------- running
def snapshot_model(dest: Path) -> tuple[LoadedModel, str]:
    """Copy checkpoints/phantom-64 (card and weights) into ``dest`` and load it from there."""
    from bench.common import snapshot_checkpoints

    digest = snapshot_checkpoints([MODEL], dest)[MODEL]
    return load_checkpoint(dest / MODEL), digest


def peer_params(name: str, params: dict, task: str) -> dict:
    """The solver's keyword arguments: ``weight_x`` (DPS) is relative to the notes' weight per task."""
    p = {**PEER_DEFAULTS[name], **params}
    if name == "dinv_dps":
        p["weight"] = DPS_WEIGHT[task] * float(p.pop("weight_x"))
    return p


def run_peer(name: str, params: dict, steps: int, denoiser: DeepinvDenoiser, physics, y: torch.Tensor,
             seed: int = 0) -> torch.Tensor:
    """One deepinv solver on the batch ``y``; returns ``[B, C, H, W]`` in [0, 1] units (float64)."""
    if name == "dinv_diffpir":
        solver = dinv.sampling.DiffPIR(denoiser, dinv.optim.data_fidelity.L2(), sigma=NOISE, max_iter=steps,
                                       zeta=params["zeta"], lambda_=params["lambda_"])
        torch.manual_seed(seed)  # DiffPIR draws from the global generator (its seed=0 is ignored)
        x = solver(y, physics)
    elif name == "dinv_ddrm":
        solver = dinv.sampling.DDRM(denoiser, sigmas=np.linspace(1, 0, steps), eta=params["eta"],
                                    etab=params["etab"])
        torch.manual_seed(seed)  # likewise
        x = solver(y, physics)
    else:
        gen = torch.Generator().manual_seed(seed)
        if name == "dinv_dps":
            solver = dinv.sampling.DPS(denoiser, num_steps=steps, weight=params["weight"], rng=gen)
        else:
            fid = (dinv.sampling.PiGDMDataFidelity(weight=params["weight"]) if name == "dinv_pigdm"
                   else dinv.sampling.MomentMatchingDataFidelity(weight=params["weight"]))
            sde = dinv.sampling.VariancePreservingDiffusion(alpha=1.0, dtype=torch.float64)
            solver = dinv.sampling.PosteriorDiffusion(
                data_fidelity=fid, denoiser=denoiser, sde=sde, dtype=torch.float64,
                solver=dinv.sampling.DDPMSolver(timesteps=torch.linspace(1, 0, steps, dtype=torch.float64),
                                                rng=gen))
        x = solver(y, physics, seed=seed)
    return x.detach().to(torch.float64)


def ssims(x: np.ndarray, x_true: np.ndarray) -> list[float]:
    from skimage.metrics import structural_similarity

    out = []
    for i in range(len(x)):
        a = np.clip(np.asarray(x[i, 0], dtype=np.float64), 0, 1)
        out.append(float(structural_similarity(a, np.asarray(x_true[i, 0], dtype=np.float64), data_range=1.0))
                   if np.isfinite(a).all() else float("nan"))
    return out


def _mean(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()) if len(v) and np.isfinite(v).all() else None


class Bench:
    """One task's cases and operators, and a method runner that scores and times each point."""

    def __init__(self, model: LoadedModel, task: str, x_true: np.ndarray, seed_base: int = OBS_SEED):
        self.model, self.task, self.x_true = model, task, x_true
        self.spec, self.op, self.y = observe(task, x_true, seed_base=seed_base)  # float64, ours
        self.physics = deepinv_physics(task)
        self.y32 = self.y.to(torch.float32)
        self.counter = CallCounter()
        self.adapter = DeepinvDenoiser(model, self.counter)
        self.ours = LoadedModel(model.card, BackpropCountingDenoiser(model.denoiser, self.counter))

    def run(self, name: str, params: dict, steps: int) -> dict:
        b = len(self.x_true)
        self.counter.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        if name in OURS:
            method, fixed = OURS[name]
            r = run_samples(self.ours, self.op, self.y, 1, seed0=0, method=method,
                            params={**PEER_DEFAULTS.get(name, {}), **params, **fixed, "steps": steps},
                            noise_sigma=NOISE)
            x, calls, config = r["x"][0], r["nfe"], r["config"]
        else:
            kw = peer_params(name, params, self.task)
            x = run_peer(name, kw, steps, self.adapter, self.physics, self.y32).numpy()
            calls, config = self.counter.calls, {"steps": steps, **kw}
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        p, s = psnrs(x, self.x_true), ssims(x, self.x_true)
        return {"method": name, "steps": steps, "params": config, "network_calls": calls,
                "backprops": self.counter.backprops, "psnr": p, "ssim": s,
                "psnr_mean": _mean(p), "ssim_mean": _mean(s), "seconds": wall, "cpu_seconds": cpu,
                "s_per_image": wall / b, "cpu_s_per_image": cpu / b, "cases": b}


# ----------------------------------------------------------------------------- tuning
def fast_tuned(path: Path = FAST_TUNED) -> dict:
    """Our ``fast``'s tuned (lam, cg_iters) per task from bench/phantom_tasks.py --tune."""
    best = json.loads(Path(path).read_text())["best"]
    return {t: {k: v for k, v in best[t]["fast"].items() if k != "steps"} for t in TASKS if "fast" in best.get(t, {})}


def grid_points(grid: dict) -> list[dict]:
    import itertools

    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def tune(args, model, info: dict) -> dict:
    """Each peer's grid (``TUNE_GRID``, or ``--grid``) on the tuning cases at ``TUNE_STEPS``; the best
    PSNR per task into ``--tune-out``. With ``--append`` the grid points are added to that file's
    (points already there are not run again) and the best is taken over all of them: how a grid
    whose best lies on its edge is extended."""
    x_true = held_out_phantoms(args.tune_cases, seed=TUNE_SEED)
    methods = [m for m in args.methods.split(",") if m]
    extra = json.loads(args.grid) if args.grid else {}
    grids = {m: extra.get(m, TUNE_GRID[m]) for m in methods}
    steps = {m: (SMOKE_STEPS if args.smoke else TUNE_STEPS[m]) for m in methods}
    if args.smoke:  # one point per grid: the code path, not the answer
        grids = {m: {k: v[:1] for k, v in g.items()} for m, g in grids.items()}
    tasks = args.tasks.split(",")[:1] if args.smoke else args.tasks.split(",")
    prev_path = Path(args.tune_out) if args.tune_out else None
    if args.append and prev_path is not None and prev_path.exists():
        out = json.loads(prev_path.read_text())
        if (out["cases"], out["model"]["weights_sha256_16"]) != (args.tune_cases, info["weights_sha256_16"]):
            raise SystemExit(f"--append: {prev_path} was tuned on other cases or weights")
        out.setdefault("extensions", []).append({"tasks": tasks, "grid": grids, "updated": _now()})
        for m, g in grids.items():  # the union of the values tried, for the record
            for k, v in g.items():
                known = out["grid"].setdefault(m, {}).setdefault(k, [])
                known.extend(x for x in v if x not in known)
        out["seconds_before_append"] = out.get("seconds", 0) + out.get("seconds_before_append", 0)
    else:
        out = {"benchmark": "bench/peers.py --tune", "model": info, "cases": args.tune_cases, "seed": TUNE_SEED,
               "obs_seed_base": OBS_SEED + 7, "noise_sigma": NOISE, "grid": grids, "steps": steps,
               "dps_weight_base": DPS_WEIGHT, "environment": environment(torch.get_num_threads()),
               "updated": _now(), "results": {}, "best": {}}
    out["updated"] = _now()
    t_start = time.perf_counter()
    for task in tasks:
        bench = Bench(model, task, x_true, seed_base=OBS_SEED + 7)  # the tuning observations of phantom_tasks
        res, best = out["results"].setdefault(task, {}), out["best"].setdefault(task, {})
        for m in methods:
            rows = res.setdefault(m, [])
            for p in grid_points(grids[m]):
                if any(all(r.get(k) == v for k, v in p.items()) for r in rows):
                    continue
                e = bench.run(m, p, steps[m])
                rows.append({**p, "steps": steps[m], "psnr": e["psnr_mean"], "ssim": e["ssim_mean"],
                             "network_calls": e["network_calls"], "s_per_image": e["s_per_image"]})
                print(f"  tune {task:18s} {m:13s} {json.dumps(p):44s} PSNR {_f(e['psnr_mean'])}  "
                      f"{e['s_per_image']:.2f} s/img", file=sys.stderr, flush=True)
            scored = [r for r in rows if r["psnr"] is not None]
            if scored:
                top = max(scored, key=lambda r: r["psnr"])
                best[m] = {k: top[k] for k in grids[m]}
        if args.tune_out:
            out["seconds"] = time.perf_counter() - t_start
            atomic_write_json(Path(args.tune_out), out)
    out["seconds"] = time.perf_counter() - t_start
    if args.tune_out:
        atomic_write_json(Path(args.tune_out), out)
    print(json.dumps(out["best"], indent=1), file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- the bench
def plan(task: str, tuned: dict, fast: dict, args) -> list[tuple[str, str, dict, int]]:
    """``(series, method, params, steps)`` for every point of a task."""
    pts = []
    smoke = args.smoke
    ft = fast.get(task, {"lam": 1.0, "cg_iters": 1})
    fsteps = [SMOKE_STEPS] if smoke else [int(s) for s in args.fast_steps.split(",") if s]
    for s in fsteps:
        pts.append((f"fast (cg_iters 1, lam {ft['lam']:g})", "fast", {"lam": ft["lam"], "cg_iters": 1}, s))
    if ft.get("cg_iters", 1) != 1:
        for s in fsteps:
            pts.append((f"fast (cg_iters {ft['cg_iters']}, lam {ft['lam']:g})", "fast", dict(ft), s))
    dsteps = [SMOKE_STEPS] if smoke else [int(s) for s in args.ours_dps_steps.split(",") if s]
    for s in dsteps:
        pts.append(("dps (ours, zeta 1)", "dps", {"zeta": 1.0}, s))
    for m in [m for m in args.methods.split(",") if m]:
        steps = [SMOKE_STEPS] if smoke else [int(s) for s in getattr(args, f"{m}_steps").split(",") if s]
        p = (tuned.get(task) or {}).get(m) or {}
        for s in steps:
            pts.append((PEER_LABELS[m], m, dict(p), s))
    return pts


def main_run(args, model, info: dict) -> dict:
    tuned_file = None if args.smoke and not Path(args.tuned).exists() else args.tuned
    tuned = json.loads(Path(tuned_file).read_text())["best"] if tuned_file and Path(tuned_file).exists() else {}
    if not args.smoke and not tuned:
        print(f"no tuned parameters in {args.tuned}: deepinv's defaults (run --tune first)", file=sys.stderr)
    fast = fast_tuned()
    x_true = held_out_phantoms(args.cases)
    out = {"benchmark": "bench/peers.py", "model": info, "cases": args.cases, "held_out_seed": HELD_OUT_SEED,
           "noise_sigma": NOISE, "tuned_from": repo_path(tuned_file), "fast_tuned_from": str(FAST_TUNED.relative_to(ROOT)),
           "tuned": tuned, "fast_tuned": fast, "deepinv": dinv.__version__, "smoke": bool(args.smoke),
           "environment": environment(torch.get_num_threads()), "updated": _now(),
           "notes": ("one posterior sample per case, clipped to [0, 1]; PSNR data range 1; network_calls and "
                     "backprops counted per case (batched calls); s_per_image = batch wall time / cases"),
           "tasks": {}}
    prev = json.loads(Path(args.out).read_text()) if args.append and args.out and Path(args.out).exists() else None
    if prev is not None:  # add points to an earlier run of the same cases and weights
        if (prev["cases"], prev["model"]["weights_sha256_16"]) != (args.cases, info["weights_sha256_16"]):
            raise SystemExit(f"--append: {args.out} has other cases or weights")
        out["tasks"] = prev["tasks"]
        out["seconds_before_append"] = prev.get("seconds", 0) + prev.get("seconds_before_append", 0)
    t_start = time.perf_counter()
    for task in args.tasks.split(","):
        bench = Bench(model, task, x_true)
        td = out["tasks"].setdefault(task, {"operator": task_spec_summary(task), "points": []})
        xc, cinfo = classical_baseline(task, bench.spec, bench.y, x_true)
        td["classical"] = {"name": cinfo["name"], "psnr_mean": _mean(psnrs(xc, x_true)),
                           "ssim_mean": _mean(ssims(xc, x_true))}
        rows = td["points"]
        done = {(e["series"], e["steps"]) for e in rows}
        for series, m, p, s in plan(task, tuned, fast, args):
            if (series, s) in done:
                continue
            e = bench.run(m, p, s)
            e["series"] = series
            rows.append(e)
            print(f"  {task:18s} {series:34s} steps {s:5d}  PSNR {_f(e['psnr_mean'])}  SSIM {_f(e['ssim_mean'], '.3f')}"
                  f"  calls {e['network_calls']:5d}  bp {e['backprops']:5d}  {e['s_per_image']:.2f} s/img",
                  file=sys.stderr, flush=True)
            out["seconds"] = time.perf_counter() - t_start
            if args.out:
                atomic_write_json(Path(args.out), out)
    out["seconds"] = time.perf_counter() - t_start
    if args.out:
        atomic_write_json(Path(args.out), out)
    report(out, args.plots)
    return out


def task_spec_summary(task: str) -> dict:
    spec = task_spec(task)
    d = {k: v for k, v in spec.items() if k != "mask"}
    if "mask" in spec:
        d["observed_fraction"] = float(np.mean(spec["mask"]))
    return d


# ----------------------------------------------------------------------------- report
def _f(v, spec: str = ".2f") -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def series_of(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in points:
        out.setdefault(e["series"], []).append(e)
    return out


def table(task: str, points: list[dict]) -> str:
    lines = ["| method | steps | PSNR dB | SSIM | network calls | backprops | s / image | CPU s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for e in points:
        lines.append(f"| {e['series']} | {e['steps']} | {_f(e['psnr_mean'])} | {_f(e['ssim_mean'], '.3f')} | "
                     f"{e['network_calls']} | {e['backprops']} | {e['s_per_image']:.2f} | {e['cpu_s_per_image']:.2f} |")
    return "\n".join(lines)


def comparisons(points: list[dict], key: str = "s_per_image") -> list[dict]:
    """Each peer point against our ``fast`` (every ``fast`` point of the task, both series): the best
    ``fast`` PSNR within the peer point's network calls and within its time (step functions over the
    points run, no interpolation), and the least time a ``fast`` point needs to reach the peer point's
    PSNR (``speedup`` = peer time / that time; None: no ``fast`` point reaches it)."""
    fast = [e for e in points if e["series"].startswith("fast") and e["psnr_mean"] is not None]
    rows = []
    for e in points:
        if e["series"].startswith("fast") or e["psnr_mean"] is None:
            continue
        within_calls = [f for f in fast if f["network_calls"] <= e["network_calls"]]
        within_time = [f for f in fast if f[key] <= e[key]]
        reach = [f for f in fast if f["psnr_mean"] >= e["psnr_mean"]]
        bc = max(within_calls, key=lambda f: f["psnr_mean"], default=None)
        bt = max(within_time, key=lambda f: f["psnr_mean"], default=None)
        br = min(reach, key=lambda f: f[key], default=None)
        rows.append({"peer": e["series"], "steps": e["steps"], "psnr": e["psnr_mean"],
                     "network_calls": e["network_calls"], "s": e[key],
                     "fast_within_calls": _brief(bc, key), "fast_within_time": _brief(bt, key),
                     "fast_to_reach": _brief(br, key), "speedup": (e[key] / br[key]) if br else None})
    return rows


def _brief(f: dict | None, key: str) -> dict | None:
    return None if f is None else {"series": f["series"], "steps": f["steps"], "psnr": f["psnr_mean"],
                                   "network_calls": f["network_calls"], "s": f[key]}


def _cg(f: dict) -> str:
    return f["series"].split(",")[0].replace("fast (", "")


def comparison_table(rows: list[dict]) -> str:
    """Markdown: each peer point, and what our ``fast`` does within its calls and its time."""
    lines = ["| peer point | PSNR | calls | s / image | best `fast` within its calls (diff) | "
             "best `fast` within its time (diff) | fastest `fast` at or above its PSNR (speed-up) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for k in ("fast_within_calls", "fast_within_time"):
            f = r[k]
            cells.append("–" if f is None else
                         f"{_f(f['psnr'])} ({f['psnr'] - r['psnr']:+.2f}; {f['steps']} steps, {_cg(f)})")
        f = r["fast_to_reach"]
        cells.append("none" if f is None else
                     f"{f['s']:.2f} s ({r['speedup']:.1f}x; {f['steps']} steps, {_cg(f)})")
        lines.append(f"| {r['peer']} {r['steps']} | {_f(r['psnr'])} | {r['network_calls']} | {r['s']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


STYLE = {"fast (cg_iters 0": ("black", "h", "-"), "fast (cg_iters 1": ("tab:red", "o", "-"), "fast (cg_iters": ("darkred", "s", "-"),
         "dps (ours": ("tab:pink", "*", "-"), "DPS (deepinv)": ("tab:blue", "v", "--"),
         "DiffPIR (deepinv)": ("tab:green", "^", "--"), "DDRM (deepinv)": ("tab:orange", "D", "--"),
         "PiGDM (deepinv)": ("tab:purple", "P", "--"), "MomentMatching (deepinv)": ("tab:brown", "X", "--")}


def _style(series: str):
    for k, v in STYLE.items():
        if series.startswith(k):
            return v
    return ("gray", "o", ":")


def plot(task: str, points: list[dict], path: Path, cases: int, classical: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for series, pts in series_of(points).items():
        pts = [e for e in pts if e["psnr_mean"] is not None]
        if not pts:
            continue
        color, marker, ls = _style(series)
        for ax, key in zip(axes, ("s_per_image", "network_calls")):
            pp = sorted(pts, key=lambda e: e[key])
            ax.plot([max(e[key], 1e-3) for e in pp], [e["psnr_mean"] for e in pp], ls, color=color, marker=marker,
                    label=series)
            for e in pp:
                ax.annotate(str(e["steps"]), (max(e[key], 1e-3), e["psnr_mean"]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7, color=color)
    if classical:
        for ax in axes:
            ax.axhline(classical["psnr_mean"], color="gray", ls=":", lw=1, label=f"classical ({classical['name']})")
    axes[0].set_xlabel("wall seconds per image (batch of cases, 1 thread)")
    axes[1].set_xlabel("network calls per image")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"phantom-64, {task}: PSNR vs cost ({cases} held-out cases, noise 0.02; labels = steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(data: dict, plots_dir) -> str:
    """Markdown tables and comparisons per task (printed and returned); the PNGs into ``plots_dir``
    (a smoke run draws the first task's only)."""
    parts = []
    for i, (task, d) in enumerate(data["tasks"].items()):
        pts = d["points"]
        cl = d.get("classical")
        parts.append(f"### {task}\n\n{table(task, pts)}\n")
        if cl:
            parts.append(f"classical ({cl['name']}): PSNR {_f(cl['psnr_mean'])}, SSIM {_f(cl['ssim_mean'], '.3f')}\n")
        if plots_dir and (i == 0 or not data.get("smoke")):
            p = plot(task, pts, Path(plots_dir) / f"peers-{task}.png", data["cases"], cl)
            parts.append(f"plot: {repo_path(p)}\n")
        parts.append(comparison_table(comparisons(pts)) + "\n")
    text = "\n".join(parts)
    print(text)
    return text


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="2 cases, 2 steps per method, tuning cut to one point per method on one task")
    p.add_argument("--tune", action="store_true", help="grid-search the peers' parameters on the tuning cases")
    p.add_argument("--report", action="store_true", help="tables and plots from --out again, running nothing")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--tune-cases", type=int, default=3)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(PEER_LABELS),
                   help="the deepinv peers, and fast_prox (our fast with cg_iters 0, tuned like a peer)")
    for m, steps in PEER_STEPS.items():
        p.add_argument(f"--{m.replace('_', '-')}-steps", dest=f"{m}_steps", default=",".join(map(str, steps)))
    p.add_argument("--fast-steps", default=",".join(map(str, FAST_STEPS)))
    p.add_argument("--ours-dps-steps", default=",".join(map(str, OURS_DPS_STEPS)), help="'' for none")
    p.add_argument("--append", action="store_true",
                   help="add the points --out (--tune: --tune-out) lacks, same cases and weights, "
                        "instead of starting afresh")
    p.add_argument("--grid", default=None,
                   help='JSON replacing TUNE_GRID per method, e.g. \'{"dinv_pigdm": {"weight": [10, 30]}}\'')
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--tuned", default=str(TUNE_OUT))
    p.add_argument("--tune-out", default=str(TUNE_OUT))
    p.add_argument("--plots", default=str(PLOTS), help="folder of the PNGs ('' for none)")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.report:
        return {"report": report(json.loads(Path(args.out).read_text()), args.plots)}
    set_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        if args.smoke:
            args.cases = args.tune_cases = 2
            for k in ("out", "tune_out", "plots"):  # never the real results unless named
                if getattr(args, k) in (str(OUT), str(TUNE_OUT), str(PLOTS)):
                    setattr(args, k, str(tmp / Path(getattr(args, k)).name))
            args.tuned = args.tune_out
        model, digest = snapshot_model(tmp / "models")
        tr = model.card.get("training") or {}
        info = {"id": MODEL, "training_steps": tr.get("steps"), "weights_sha256_16": digest,
                "snapshot": "checkpoints/phantom-64 copied to a temporary folder before the run"}
        print(f"{MODEL}: training steps {info['training_steps']}, weights {digest}; deepinv {dinv.__version__}; "
              f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
        result = {}
        if args.tune or args.smoke:
            result["tune"] = tune(args, model, info)
        if not args.tune or args.smoke:
            result["run"] = main_run(args, model, info)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
