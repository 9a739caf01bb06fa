"""Unconditional sample quality of the probability-flow ODE solvers at equal network calls.

    .venv/bin/python bench/unconditional_samplers.py --threads 1       # 16 samples, 10 / 20 / 50 calls
    .venv/bin/python bench/unconditional_samplers.py --models grf-32 --nfe 10,20   # seconds, no network

Euler, EDM Heun and DPM-Solver++(2M) (``guidance.unconditional``) on the Karras schedule (rho 7)
between the model's ``sigma_min`` and ``sigma_max``, each given a budget of network calls: Euler and
DPM-Solver++(2M) take one step per call, Heun ``(budget + 1) // 2`` steps for ``2 steps - 1``
calls (the NFE column is the calls made, counted by ``CountingDenoiser``). Every solver, and the
reference, starts from the same noise (``--seed``; ``--num`` samples per setting).

Measured per model:

- all: ``ode_err``, the median over samples of ``||x - x_ref|| / ||x_ref||`` (network space) against
  the same ODE solved from the same noise with ``--ref-nfe`` calls of Heun (grf-32: its exact flow):
  the solver's own discretization error, free of sampling noise;
- ``grf-32`` (exact denoiser): ``cov_err``, the relative Frobenius error of the samples' exact
  covariance against the prior's. With a linear, shift-equivariant ``D`` each solver is a linear
  shift-equivariant map; its response to an impulse gives each Fourier mode's gain ``m_k``, so the
  samples started from the ODE's exact marginal ``N(0, sigma_max^2 I + C)`` have variance
  ``m_k^2 (sigma_max^2 + lambda_k)`` per mode (exact, no Monte Carlo). Started from
  ``N(0, sigma_max^2 I)`` instead (what the samplers draw) even the exact flow is off by
  ``exact_flow_cov_err_plain_start`` (the prior's mean mode has variance 833 against 6400);
- ``phantom-64``: ``w1``, the Wasserstein-1 distance between the pixel intensities of the samples
  (physical units, unclipped) and of 256 held-out phantoms (``HELD_OUT_SEED``); ``grad_w1`` the
  same for the gradient magnitude ``|grad x|`` (sharpness); the floor is what ``--num`` phantoms of
  another seed (``TUNE_SEED``) score;
- ``darcy-64``: ``pde_res``, the median relative Darcy residual of the samples
  (``DarcyResidual.relative_residual``, as ``bench/sample_grid.py`` measures it; data: ~1e-13), and
  with ``a`` thresholded at 7.5, the median consistency ``||u - solve(a_thr)|| / ||solve(a_thr)||`` and
  the fraction of ``a`` within 1 of {3, 12}.

Writes ``bench/results/unconditional-samplers.json`` and prints a markdown table. Load the
checkpoints from a snapshot (``--checkpoints DIR`` holding ``<id>/card.json`` and
``<id>/weights.safetensors``) while a training run is exporting.
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
from bench.common import (repo_path, CHECKPOINTS, HELD_OUT_SEED, RESULTS, TUNE_SEED, atomic_write_json,  # noqa: E402
                          environment, held_out_darcy, held_out_phantoms, set_threads, weights_digest)
from bench.sample_grid import darcy_stats  # noqa: E402
from guidance.unconditional import SOLVERS, sample_unconditional, steps_for_nfe  # noqa: E402
from models.checkpoint import builtin_models, load_checkpoint  # noqa: E402
from models.denoiser import CountingDenoiser  # noqa: E402
from models.schedules import get_sigmas  # noqa: E402

OUT = RESULTS / "unconditional-samplers.json"
LABELS = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM-Solver++(2M)", "ancestral": "ancestral"}


def load(model_id: str, checkpoints: Path):
    """The model and its description (weights digest of the folder actually loaded)."""
    if model_id in builtin_models():
        return builtin_models()[model_id], {"id": model_id, "kind": "analytic"}
    folder = checkpoints / model_id
    model = load_checkpoint(folder)
    tr = model.card.get("training") or {}
    return model, {"id": model_id, "training_steps": tr.get("steps"), "training_updated": tr.get("updated"),
                   "weights_sha256_16": weights_digest(model_id, folder), "folder": repo_path(folder)}


def run_solver(model, solver: str, budget: int, num: int, seed: int) -> dict:
    den = CountingDenoiser(model.denoiser)
    steps = steps_for_nfe(solver, budget)
    sig = get_sigmas("karras", steps, den.sigma_min, den.sigma_max)
    t0 = time.perf_counter()
    x = sample_unconditional(den, sig, num, torch.Generator().manual_seed(seed), solver)
    return {"x": x, "steps": steps, "nfe": den.nfe, "seconds": time.perf_counter() - t0}


def ode_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    d = (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    return float(d.median())


def physical(model, x: torch.Tensor) -> np.ndarray:
    return (model.shift.view(1, -1, 1, 1) + model.scale.view(1, -1, 1, 1) * x).numpy()


# ----------------------------------------------------------------------------- grf-32
def grf_gain(den, solver: str, steps: int) -> torch.Tensor:
    """Each Fourier mode's gain of the solver (its response to a unit impulse; see the docstring)."""
    impulse = torch.zeros((1,) + tuple(den.shape), dtype=torch.float64)
    impulse[..., 0, 0] = 1
    sig = get_sigmas("karras", steps, den.sigma_min, den.sigma_max)
    return torch.fft.fft2(sample_unconditional(den, sig, 0, None, solver, x=impulse)[0, 0]).real


def grf_cov_stats(den, var: torch.Tensor) -> dict:
    lam = den.lam
    return {"cov_err": float((var - lam).norm() / lam.norm()), "pixel_var": float(var.mean() / lam.mean())}


def grf_exact(den, x_start: torch.Tensor) -> torch.Tensor:
    """The exact flow from ``sigma_max`` to ``sigma_min``, then ``D`` (every solver's last step)."""
    lam, s0, s1 = den.lam, den.sigma_max, den.sigma_min
    gain = torch.sqrt((lam + s1 ** 2) / (lam + s0 ** 2))
    return den(torch.fft.ifft2(gain * torch.fft.fft2(x_start)).real, s1)


# ----------------------------------------------------------------------------- phantom-64
def phantom_stats(x: np.ndarray, data: np.ndarray) -> dict:
    from scipy.stats import wasserstein_distance

    def grad(v):
        gx, gy = np.diff(v, axis=-1)[..., :-1, :], np.diff(v, axis=-2)[..., :, :-1]
        return np.sqrt(gx ** 2 + gy ** 2)
    return {"w1": float(wasserstein_distance(x.ravel(), data.ravel())),
            "grad_w1": float(wasserstein_distance(grad(x).ravel(), grad(data).ravel())),
            "out_of_range": float(np.mean((x < -0.05) | (x > 1.05)))}


def darcy_summary(x: np.ndarray) -> dict:
    s = darcy_stats(x)
    return {"pde_res": float(np.median(s["pde_res"])),
            "pde_res_thresholded_a": float(np.median(s["pde_res_thresholded_a"])),
            "consistency": float(np.median(s["consistency"])),
            "a_bimodal": float(np.mean(s["a_within_1_of_3_or_12"]))}


# ----------------------------------------------------------------------------- main
def bench_model(model_id: str, args) -> dict:
    model, info = load(model_id, Path(args.checkpoints))
    solvers, budgets = args.solvers.split(","), [int(b) for b in args.nfe.split(",")]
    out = {"model": info, "runs": {}}
    analytic = info.get("kind") == "analytic"
    if analytic:
        den = model.denoiser
        x_start = den.sigma_max * torch.randn((args.num,) + tuple(den.shape),
                                              generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
        ref = grf_exact(den, x_start)
        lam, s0, s1 = den.lam, den.sigma_max, den.sigma_min
        flow = (lam + s1 ** 2) / (lam + s0 ** 2) * (lam / (lam + s1 ** 2)) ** 2  # gain^2 of the exact flow, then D
        out["reference"] = {"what": "exact flow (analytic)",
                            "exact_flow_cov_err": grf_cov_stats(den, flow * (s0 ** 2 + lam))["cov_err"],
                            "exact_flow_cov_err_plain_start": grf_cov_stats(den, flow * s0 ** 2)["cov_err"]}
    else:
        r = run_solver(model, "heun", args.ref_nfe, args.num, args.seed)
        ref = r["x"]
        out["reference"] = {"what": f"Heun, {r['steps']} steps", "nfe": r["nfe"], "seconds": r["seconds"]}
    if model_id.startswith("phantom"):
        data = held_out_phantoms(256, seed=HELD_OUT_SEED)
        floor = phantom_stats(held_out_phantoms(args.num, seed=TUNE_SEED), data)
        out["data"] = {"what": f"{args.num} phantoms of seed {TUNE_SEED} against the 256 held-out ones", **floor}
        out["reference"].update(phantom_stats(physical(model, ref), data))
    elif model.card.get("pde"):
        out["data"] = {"what": f"{args.num} held-out pairs", **darcy_summary(held_out_darcy(args.num))}
        out["reference"].update(darcy_summary(physical(model, ref)))
    for solver in solvers:
        for budget in budgets:
            if analytic:
                steps = steps_for_nfe(solver, budget)
                den = CountingDenoiser(model.denoiser)
                sig = get_sigmas("karras", steps, den.sigma_min, den.sigma_max)
                t0 = time.perf_counter()
                x = sample_unconditional(den, sig, args.num, None, solver, x=x_start.clone())
                r = {"x": x, "steps": steps, "nfe": den.nfe, "seconds": time.perf_counter() - t0}
            else:
                r = run_solver(model, solver, budget, args.num, args.seed)
            e = {"steps": r["steps"], "nfe": r["nfe"], "seconds": round(r["seconds"], 2),
                 "ode_err": ode_error(r["x"], ref)}
            if analytic:
                if solver != "ancestral":
                    gden = model.denoiser
                    gain = grf_gain(gden, solver, r["steps"])
                    e.update(grf_cov_stats(gden, gain ** 2 * (gden.sigma_max ** 2 + gden.lam)))
            elif model_id.startswith("phantom"):
                e.update(phantom_stats(physical(model, r["x"]), data))
            elif model.card.get("pde"):
                e.update(darcy_summary(physical(model, r["x"])))
            out["runs"].setdefault(solver, {})[str(budget)] = e
            brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
            print(f"{model_id} {solver} budget {budget}: {brief}", file=sys.stderr, flush=True)
    return out


def g(v, spec=".3g"):
    return "–" if v is None else format(v, spec)


def table(result: dict) -> str:
    m = result["models"]
    cols = []  # (header, model, key, format): the columns of each model, by its kind (its id's prefix)
    for mid in m:
        if mid.startswith("grf"):
            cols += [(f"{mid} covariance error", mid, "cov_err", ".3f"), (f"{mid} ODE error", mid, "ode_err", ".2g")]
        elif mid.startswith("phantom"):
            cols += [(f"{mid} intensity W1", mid, "w1", ".4f"), (f"{mid} gradient W1", mid, "grad_w1", ".4f"),
                     (f"{mid} ODE error", mid, "ode_err", ".3f")]
        elif mid.startswith("darcy"):
            cols += [(f"{mid} median PDE residual", mid, "pde_res", ".3g"), (f"{mid} ODE error", mid, "ode_err", ".3f")]
    lines = ["| solver | network calls | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    budgets = result["nfe_budgets"]
    for b in budgets:
        for solver in result["solvers"]:
            cells, nfe = [], None
            for _, mid, key, spec in cols:
                e = m[mid]["runs"].get(solver, {}).get(str(b), {})
                nfe = e.get("nfe", nfe)
                cells.append(g(e.get(key), spec))
            lines.append(f"| {LABELS.get(solver, solver)} | {nfe} | " + " | ".join(cells) + " |")
    ref_cells, data_cells = [], []
    for _, mid, key, spec in cols:
        ref = m[mid].get("reference", {})
        ref_cells.append("0" if key == "ode_err" else g(ref.get(key if key != "cov_err" else "exact_flow_cov_err"),
                                                          ".2g" if key == "cov_err" else spec))
        data_cells.append(g((m[mid].get("data") or {}).get(key), spec))
    nfe_ref = next((m[mid]["reference"].get("nfe") for mid in m if "nfe" in m[mid]["reference"]), None)
    lines.append(f"| reference: Heun (grf-32: exact flow) | {g(nfe_ref, 'd')} | " + " | ".join(ref_cells) + " |")
    lines.append("| data (floor at this sample size) | – | " + " | ".join(data_cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="grf-32,phantom-64,phantom-flow-64,darcy-64")
    p.add_argument("--solvers", default="euler,heun,dpmpp_2m", help=f"from {list(SOLVERS)}")
    p.add_argument("--nfe", default="10,20,50", help="network-call budgets")
    p.add_argument("--num", type=int, default=16, help="samples per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-nfe", type=int, default=199, help="network calls of the Heun reference")
    p.add_argument("--checkpoints", default=str(CHECKPOINTS), help="folder of <id>/ checkpoints (a snapshot)")
    p.add_argument("--out", default=str(OUT), help="results JSON ('' for none)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    for s in args.solvers.split(","):
        if s not in SOLVERS:
            p.error(f"unknown solver {s!r}")
    t0 = time.perf_counter()
    result = {"benchmark": "unconditional-samplers", "num": args.num, "seed": args.seed,
              "schedule": "karras, rho 7, [sigma_min, sigma_max] of the model",
              "nfe_budgets": [int(b) for b in args.nfe.split(",")],
              "solvers": args.solvers.split(","), "ref_nfe": args.ref_nfe, "environment": environment(threads),
              "command": "bench/unconditional_samplers.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "models": {}}
    for mid in args.models.split(","):
        result["models"][mid] = bench_model(mid, args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.out:
        atomic_write_json(Path(args.out), result)
    print(table(result))
    print(f"\n{args.num} samples per setting, {result['seconds']:.0f} s; wrote {args.out or 'nothing'}")


if __name__ == "__main__":
    main()
