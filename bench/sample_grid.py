"""Unconditional samples of the embedded priors, drawn into PNG grids beside training-distribution examples.

    .venv/bin/python bench/sample_grid.py                    # both models, 16 samples, 50 ancestral steps
    .venv/bin/python bench/sample_grid.py --models phantom-64 --num 4 --steps 10   # quick look

Sampling goes through ``guidance.unconditional.sample_unconditional``: ``x ~ N(0, sigma_max^2)`` then
``--steps`` steps of the Karras schedule, either ancestral (DDPM-like, 1 network call a step; the
prior part of the ``fast`` method) or a probability-flow ODE solver: EDM Heun (2 calls a step but
the last), Euler or DPM-Solver++(2M) (1 call a step). ``bench/unconditional_samplers.py`` compares them.

Writes ``docs/phantom-64-samples.png`` (4 x 4 grayscale samples, 4 data examples beside) and
``docs/darcy-64-samples.png`` (each sample as ``a`` | ``u`` side by side, viridis, 4 data pairs
beside), and a summary ``bench/results/<id>-samples.json``. For Darcy each sample is labelled
with its PDE residual (``DarcyResidual.relative_residual``; as sampled / with ``a`` thresholded
at 7.5) and its consistency
``||u - solve_darcy(threshold(a))|| / ||solve_darcy(threshold(a))||``: a prior that learned the
physics gives small values for both (the data: residual ~1e-13, consistency 0).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (HELD_OUT_SEED, RESULTS, ROOT, atomic_write_json, held_out_darcy,  # noqa: E402
                          held_out_phantoms, load_model, model_info, set_threads)
from guidance.unconditional import SOLVERS, sample_unconditional  # noqa: E402
from models.denoiser import CountingDenoiser  # noqa: E402
from models.schedules import get_sigmas  # noqa: E402

DOCS = ROOT / "docs"


@torch.no_grad()
def sample_prior(model, num: int, steps: int = 50, sampler: str = "ancestral", seed: int = 0):
    """``(x [num, C, H, W] physical float64 numpy, nfe)``: unconditional samples of ``model``
    (``sampler``: one of ``guidance.unconditional.SOLVERS``)."""
    den = CountingDenoiser(model.denoiser)
    sig = get_sigmas("karras", steps, den.sigma_min, den.sigma_max)
    x = sample_unconditional(den, sig, num, torch.Generator().manual_seed(seed), sampler)
    shift = model.shift.view(1, -1, 1, 1)
    scale = model.scale.view(1, -1, 1, 1)
    return (shift + scale * x).numpy(), den.nfe


def darcy_stats(x: np.ndarray) -> dict:
    from operators.pde import DarcyResidual, solve_darcy

    pde = DarcyResidual(x.shape[1:])
    res = pde.relative_residual(torch.as_tensor(x)).numpy()
    xt = x.copy()
    xt[:, 0] = np.where(x[:, 0] >= 7.5, 12.0, 3.0)
    res_thr = pde.relative_residual(torch.as_tensor(xt)).numpy()
    cons, bimodal = [], []
    for a, u in zip(x[:, 0], x[:, 1]):
        us = solve_darcy(np.where(a >= 7.5, 12.0, 3.0))
        cons.append(float(np.linalg.norm(u - us) / np.linalg.norm(us)))
        bimodal.append(float(np.mean(np.minimum(abs(a - 3), abs(a - 12)) < 1.0)))
    return {"pde_res": res.tolist(), "pde_res_thresholded_a": res_thr.tolist(), "consistency": cons,
            "a_within_1_of_3_or_12": bimodal}


def _title(fig, model, args, nfe, extra=""):
    tr = model.card.get("training") or {}
    fig.suptitle(f"{model.id} (training step {tr.get('steps')}): {args.num} unconditional samples\n"
                 f"{args.sampler}, {args.steps} steps, {nfe} network evaluations{extra}", fontsize=8)


def phantom_grid(model, args, out: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    x, nfe = sample_prior(model, args.num, args.steps, args.sampler, args.seed)
    secs = time.perf_counter() - t0
    data = held_out_phantoms(4, seed=HELD_OUT_SEED)
    cols = int(np.ceil(np.sqrt(args.num)))
    rows = max(int(np.ceil(args.num / cols)), 4 if args.data else 1)
    ratios = [1] * cols + ([0.25, 1] if args.data else [])
    fig, axes = plt.subplots(rows, len(ratios), figsize=(1.3 * sum(ratios), 1.35 * rows + 0.5), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    for ax in axes.flat:
        ax.axis("off")
    for k in range(args.num):
        axes[k // cols, k % cols].imshow(np.clip(x[k, 0], 0, 1), cmap="gray", vmin=0, vmax=1)
    if args.data:
        for r in range(4):
            axes[r, cols + 1].imshow(data[r, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, cols + 1].set_title("data", fontsize=8)
        axes[0, 0].set_title("samples", fontsize=8, loc="left")
    _title(fig, model, args, nfe)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"nfe": nfe, "seconds": secs, "out_of_range_fraction": float(np.mean((x < -0.05) | (x > 1.05))),
            "mean_intensity": float(x.mean()), "data_mean_intensity": float(data.mean())}


def darcy_grid(model, args, out: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    x, nfe = sample_prior(model, args.num, args.steps, args.sampler, args.seed)
    secs = time.perf_counter() - t0
    stats = darcy_stats(x)
    data = held_out_darcy(4, seed=HELD_OUT_SEED)
    dstats = darcy_stats(data)
    per_row = 4 if args.num >= 4 else args.num
    rows = max(int(np.ceil(args.num / per_row)), 4 if args.data else 1)
    ncols = 2 * per_row + (3 if args.data else 0)
    ratios = [1] * (2 * per_row) + ([0.3, 1, 1] if args.data else [])
    fig, axes = plt.subplots(rows, ncols, figsize=(1.25 * sum(ratios), 1.45 * rows + 0.7), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    for ax in axes.flat:
        ax.axis("off")
    umax = float(data[:, 1].max()) * 1.1
    for k in range(args.num):
        r, c = k // per_row, 2 * (k % per_row)
        axes[r, c].imshow(x[k, 0], cmap="viridis", vmin=3, vmax=12)
        axes[r, c + 1].imshow(x[k, 1], cmap="viridis", vmin=0, vmax=umax)
        axes[r, c].set_title(f"a  res {stats['pde_res'][k]:.2g}/{stats['pde_res_thresholded_a'][k]:.2g}", fontsize=6)
        axes[r, c + 1].set_title(f"u  cons {stats['consistency'][k]:.2f}", fontsize=6)
    if args.data:
        for r in range(4):
            axes[r, ncols - 2].imshow(data[r, 0], cmap="viridis", vmin=3, vmax=12)
            axes[r, ncols - 1].imshow(data[r, 1], cmap="viridis", vmin=0, vmax=umax)
            axes[r, ncols - 2].set_title("data a", fontsize=6)
            axes[r, ncols - 1].set_title("data u", fontsize=6)
    extra = (f"\nmedian PDE residual {np.median(stats['pde_res']):.3g} as sampled, "
             f"{np.median(stats['pde_res_thresholded_a']):.3g} with a thresholded (data {max(dstats['pde_res']):.1g}); "
             f"median consistency {np.median(stats['consistency']):.3f}\na: viridis 3..12, u: viridis 0..{umax:.4f}")
    _title(fig, model, args, nfe, extra)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"nfe": nfe, "seconds": secs, **stats,
            "median_pde_res": float(np.median(stats["pde_res"])),
            "median_pde_res_thresholded_a": float(np.median(stats["pde_res_thresholded_a"])),
            "median_consistency": float(np.median(stats["consistency"])),
            "data_pde_res_max": max(dstats["pde_res"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="phantom-64,darcy-64")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=SOLVERS, default="ancestral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-data", dest="data", action="store_false", help="leave out the data examples")
    p.add_argument("--out-dir", default=str(DOCS))
    p.add_argument("--results", default=str(RESULTS), help="folder of the <id>-samples.json summaries ('' none)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    set_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for mid in args.models.split(","):
        model = load_model(mid)
        out = out_dir / f"{mid}-samples.png"
        draw = darcy_grid if model.card.get("pde") else phantom_grid
        summary = draw(model, args, out)
        summary.update(model=model_info(model), sampler=args.sampler, steps=args.steps, num=args.num,
                       seed=args.seed, png=str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
                       updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if args.results:
            atomic_write_json(Path(args.results) / f"{mid}-samples.json", summary)
        brief = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        print(f"{mid}: wrote {out}  {brief}")


if __name__ == "__main__":
    main()
