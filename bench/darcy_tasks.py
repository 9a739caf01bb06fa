"""Validation of the darcy-64 prior on DiffusionPDE's two Darcy tasks (Huang et al., NeurIPS 2024).

    .venv/bin/python bench/darcy_tasks.py                       # full: 20 cases, both tasks, all methods
    .venv/bin/python bench/darcy_tasks.py --cases 2 --steps 10 --dps-steps 20
    .venv/bin/python bench/darcy_tasks.py --tune                # zeta grid on 3 tuning cases

Cases: held-out Darcy pairs (``bench.common.HELD_OUT_SEED``; training used seed 0), ``a`` in
{3, 12}, ``u`` the exact discrete solution. 500 random nodes of the 64 x 64 grid (one seeded
set for all cases, boundary nodes included) are observed without noise:

* ``forward``: ``a`` at the 500 nodes -> recover ``u``; headline metric: relative L2 error of ``u``;
* ``inverse``: ``u`` at the 500 nodes -> recover ``a``; headline metric: error rate of ``a``
  thresholded at 7.5 (fraction of nodes where ``(a_rec >= 7.5) != (a_true >= 7.5)``).

``name:samples=K`` scores the mean of K posterior samples per case (what a request with
``num_samples: K`` returns as ``mean``; for ``a`` thresholding the mean is the per-node
majority vote); its nfe is per sample, the compute K times that.

Every method is scored on all of: ``a_err`` (error rate), ``u_rel`` (relative L2 of ``u``),
``pde_res`` (``DarcyResidual.relative_residual`` of the recovered (a, u); ``pde_res_thr`` the
same with ``a`` thresholded at 7.5, which removes the residual that small wiggles of ``a``
make), and ``u_solve_rel``: the relative L2 error of ``solve_darcy(threshold(a_rec))`` against
the true ``u`` (for the inverse task: is the recovered ``a`` physically right, whatever the
sampled ``u``).

Methods (``--methods``, comma-separated ``name[+pde][:param=value...]``, values JSON):
``diffusion_pde`` (EDM Heun, 2 evaluations a step: ``--steps 100`` -> 199 evaluations; per-channel
``zeta_obs=[zeta_a,zeta_u]`` and ``zeta_pde``, the PDE term always attached), ``fast`` (1 a step;
``fast+pde`` adds the PDE term with ``zeta_pde``), ``dps`` (``--dps-steps``, default 200 so as
to keep within the 200-evaluation budget; ``dps+pde`` likewise), ``classical``: forward: ``a``
interpolated linearly from the 500 nodes and thresholded at 7.5, ``u = solve_darcy(a)``;
inverse: the constant ``a = 12`` (the majority class of a symmetric thresholded GRF; about 50 %
error) and ``u`` interpolated linearly from the 500 nodes.

Per-task parameters start from ``DEFAULTS`` (set by small grid searches on the weights of
early training, see ``--tune``); a ``--tune`` output passed with ``--tuned`` overrides them;
parameters in ``--methods`` override both. On the scale of the weights: the paper used
``zeta_a = 5`` (forward), ``zeta_u = 5000`` (inverse) and ``zeta_pde = 100`` from 0.8 N on, in
its units. Here (``diffusion_pde``, ``dps``) the data term is the L2 norm of the physical misfit
over the observed nodes (per channel for ``diffusion_pde``), the PDE term the RMS over nodes of
the finite-volume residual (which carries the ``h^2`` factor: values ~ ``f h^2 = 2.5e-4``),
both differentiated w.r.t. the network-space state, so the scales differ. ``fast`` weighs
squared residuals in its Kalman line search: ``zeta_obs`` the observation misfit whitened by
``noise_floor`` (0.01 when noiseless), ``zeta_pde`` the raw residual ``R``; hence its much
larger values.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import classical  # noqa: E402
from bench.common import (repo_path, HELD_OUT_SEED, OBS_SEED, TUNE_SEED, PdeTasks, check_held_out,  # noqa: E402
                          environment, fmt, held_out_darcy, pde_tasks_on, model_info, previous_tuning,
                          run_pde_tasks, run_task_method, task_bench_main, task_bench_parser, tune_pde_tasks,
                          update_card, validation_summary)
from operators.pde import solve_darcy  # noqa: E402
from operators.spec import build_operator, build_pde  # noqa: E402

MODEL = "darcy-64"
SHAPE = (2, 64, 64)
N_OBS = 500
THRESHOLD = 7.5
A_LOW, A_HIGH = 3.0, 12.0
TASKS = ("forward", "inverse")
DEFAULT_METHODS = "diffusion_pde,fast,dps,dps:steps=50:samples=4,classical"
#: Starting parameters per task (before tuning); --steps / --dps-steps set the step counts.
DEFAULTS = {
    "forward": {"diffusion_pde": {"zeta_obs": [3.0, 0.0], "zeta_pde": 100.0},
                "fast": {"cg_iters": 5}, "fast+pde": {"zeta_pde": 1e6},
                "dps": {"zeta": 0.3}, "dps+pde": {"zeta": 0.3, "zeta_pde": 100.0}},
    "inverse": {"diffusion_pde": {"zeta_obs": [0.0, 10000.0], "zeta_pde": 100.0},
                "fast": {"zeta_obs": 1e6, "cg_iters": 5}, "fast+pde": {"zeta_obs": 1e4, "zeta_pde": 1e6},
                "dps": {"zeta": 300.0}, "dps+pde": {"zeta": 300.0, "zeta_pde": 100.0}},
}
#: --tune grids (per task; a list of values per parameter, zeta_obs as [zeta_a, zeta_u] lists).
#: Parameters a grid leaves out come from DEFAULTS (e.g. fast+pde's zeta_obs).
TUNE_GRID = {
    "forward": {"diffusion_pde": {"zeta_obs": [[1.0, 0.0], [3.0, 0.0], [10.0, 0.0]], "zeta_pde": [100.0]},
                "fast": {"zeta_obs": [1.0], "cg_iters": [1, 5]},
                "fast+pde": {"zeta_pde": [1e4, 1e6, 1e8]},
                "dps": {"zeta": [0.1, 0.3, 1.0]}},
    "inverse": {"diffusion_pde": {"zeta_obs": [[0.0, 3000.0], [0.0, 10000.0], [0.0, 30000.0]], "zeta_pde": [100.0]},
                "fast": {"zeta_obs": [1e4, 1e6], "cg_iters": [1, 5]},
                "fast+pde": {"zeta_pde": [1e4, 1e6, 1e8]},
                "dps": {"zeta": [100.0, 300.0, 1000.0]}},
}
HEADLINE = {"forward": "u_rel", "inverse": "a_err"}


# ----------------------------------------------------------------------------- problem
def observed_nodes(n: int = 64, num: int = N_OBS, seed: int = OBS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``num`` distinct nodes of the ``n x n`` grid (boundary included), one seeded draw."""
    flat = np.sort(np.random.default_rng(seed).choice(n * n, size=num, replace=False))
    return flat // n, flat % n


def task_problem(task: str, x_true: np.ndarray, noise: float = 0.0, seed: int = OBS_SEED, shape=SHAPE):
    """``(spec, operator, y [B, 500], rows, cols)`` for ``task`` (channel a or u observed) on a
    model of ``shape`` ``(2, n, n)`` (channels a, u; pde_tasks.py shares it)."""
    ch = {"forward": 0, "inverse": 1}[task]
    rows, cols = observed_nodes(shape[-1])
    spec = {"kind": "sparse_points", "points": np.stack([np.full_like(rows, ch), rows, cols], 1)}
    op = build_operator(spec, tuple(shape))
    y = op.forward(torch.as_tensor(x_true, dtype=torch.float64))
    if noise:
        g = torch.Generator().manual_seed(seed + 17 * (ch + 1))
        y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return spec, op, y, rows, cols


def threshold(a: np.ndarray) -> np.ndarray:
    return np.where(a >= THRESHOLD, A_HIGH, A_LOW)


def metrics(x: np.ndarray, x_true: np.ndarray, pde) -> dict:
    """Per-case metrics (lists) of recovered fields ``x [B, 2, n, n]`` (physical units)."""
    out = {"a_err": [], "u_rel": [], "pde_res": [], "pde_res_thr": [], "u_solve_rel": []}
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    xc = np.nan_to_num(x)
    res = pde.relative_residual(torch.as_tensor(xc, dtype=torch.float64)).numpy()
    xc[:, 0] = threshold(xc[:, 0])
    res_thr = pde.relative_residual(torch.as_tensor(xc, dtype=torch.float64)).numpy()
    for i in range(len(x)):
        if not finite[i]:
            for v in out.values():
                v.append(float("nan"))
            continue
        a, u = x[i, 0], x[i, 1]
        at, ut = x_true[i, 0], x_true[i, 1]
        out["a_err"].append(float(np.mean((a >= THRESHOLD) != (at >= THRESHOLD))))
        out["u_rel"].append(float(np.linalg.norm(u - ut) / np.linalg.norm(ut)))
        out["pde_res"].append(float(res[i]))
        out["pde_res_thr"].append(float(res_thr[i]))
        out["u_solve_rel"].append(float(np.linalg.norm(solve_darcy(threshold(a)) - ut) / np.linalg.norm(ut)))
    return out


def classical_baseline(task: str, y: torch.Tensor, rows, cols) -> tuple[np.ndarray, str]:
    n = SHAPE[-1]
    out = np.zeros((len(y),) + SHAPE)
    for i in range(len(y)):
        v = y[i].numpy()
        if task == "forward":
            a = threshold(classical.interpolate_points(v, rows, cols, n, "linear"))
            out[i, 0], out[i, 1] = a, solve_darcy(a)
        else:
            out[i, 0] = A_HIGH
            out[i, 1] = classical.interpolate_points(v, rows, cols, n, "linear")
    name = ("a: linear interpolation of the 500 values, thresholded at 7.5; u = solve_darcy(a)"
            if task == "forward" else
            "a: constant 12 (majority class, ~50 % error); u: linear interpolation of the 500 values")
    return out, name


# ----------------------------------------------------------------------------- running
def run_method(model, task, op, y, x_true, rows, cols, name, params, pde, noise=0.0, verbose=True,
               completion="auto") -> dict:
    """Score one method on a task's batch (``bench.common.run_task_method``: samples get the
    service's physics completion, ``auto`` re-solving ``u`` from ``a`` in the forward task, so the
    figures are what a request returns)."""
    return run_task_method(model, op, y, name, params, pde, metrics=lambda x: metrics(x, x_true, pde),
                           baseline=lambda: classical_baseline(task, y, rows, cols), label=task, noise=noise,
                           verbose=verbose, completion=completion)


def row_text(task: str, label: str, e: dict) -> str:
    return (f"{task:8s} {label:44s} {fmt(e['a_err_mean'], '.4f'):>7s} {fmt(e['u_rel_mean'], '.4f'):>7s} "
            f"{fmt(e.get('u_rel_sampled_mean'), '.4f'):>9s} "
            f"{fmt(e['u_solve_rel_mean'], '.4f'):>8s} {fmt(e['pde_res_mean'], '.3g'):>8s} "
            f"{fmt(e['pde_res_thr_mean'], '.3g'):>8s} {e['nfe']:>5d} "
            f"{e['seconds']:>8.1f}" + ("  DIVERGED" if e.get("diverged") else ""))


TABLE_HEAD = (f"{'task':8s} {'method':44s} {'a_err':>7s} {'u_rel':>7s} {'u_sampled':>9s} {'u_solve':>8s} {'pde_res':>8s} {'res_thr':>8s} "
              f"{'nfe':>5s} {'seconds':>8s}")


def tasks_on(model, x_true: np.ndarray, pde, args) -> PdeTasks:
    """The shared run / tune loops' view of these cases."""
    return pde_tasks_on(model, x_true, pde, args, task_problem=task_problem, run_method=run_method,
                        defaults=DEFAULTS, row_text=row_text, head=TABLE_HEAD, headline=HEADLINE,
                        sane_keys=("a_err", "u_rel", "pde_res"))


def main_run(args, model) -> None:
    tuned = json.loads(Path(args.tuned).read_text())["best"] if args.tuned else {}
    x_true = held_out_darcy(args.cases)
    print(f"held-out check: {check_held_out(x_true, MODEL)}", file=sys.stderr)
    pde = build_pde({"kind": "darcy"}, SHAPE, model.card["pde"])
    info = model_info(model)
    header = {"benchmark": "bench/darcy_tasks.py", "model": info, "cases": args.cases,
              "held_out_seed": HELD_OUT_SEED, "observed_nodes": N_OBS, "noise_sigma": args.noise,
              "tuned_from": repo_path(args.tuned), "environment": environment(torch.get_num_threads()),
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "completion": args.completion,
              "metrics_note": ("a_err: error rate of a thresholded at 7.5; u_rel: relative L2 of u as returned "
                               "(after physics completion where it applied: u re-solved from a snapped to "
                               "{3, 12}); u_rel_sampled: the same before completion; "
                               "pde_res: relative residual of (a, u) as returned (pde_res_thr: a thresholded); "
                               "u_solve_rel: relative L2 of solve_darcy(threshold(a)) vs true u; "
                               "one posterior sample per case"),
              "ground_truth_pde_res": float(pde.relative_residual(torch.as_tensor(x_true)).max())}
    print(f"{MODEL}: training steps {info['training_steps']}, weights {info['weights_sha256_16']}, "
          f"{args.cases} cases, {N_OBS} observed nodes", file=sys.stderr)
    rows_out, _ = run_pde_tasks(args, tasks_on(model, x_true, pde, args), header, tuned, info["training_steps"])
    print("\n" + TABLE_HEAD)
    for r in rows_out:
        print(row_text(*r))
    if args.update_card:
        data = json.loads(Path(args.out).read_text())
        update_card(MODEL, validation=card_validation(data))
        print(f"wrote the validation summary into checkpoints/{MODEL}/card.json", file=sys.stderr)


def card_validation(data: dict) -> dict:
    return validation_summary(data, ("a_err_mean", "u_rel_mean", "u_rel_sampled_mean", "u_solve_rel_mean",
                                     "pde_res_mean", "pde_res_thr_mean"))


def tune(args, model) -> None:
    x_true = held_out_darcy(args.tune_cases, seed=TUNE_SEED)
    pde = build_pde({"kind": "darcy"}, SHAPE, model.card["pde"])
    grids = {t: dict(g) for t, g in TUNE_GRID.items()}
    for t, g in (json.loads(args.grid) if args.grid else {}).items():
        grids[t].update(g)
    out = previous_tuning(args.tune_out)
    out.update({"benchmark": "bench/darcy_tasks.py --tune", "model": model_info(model), "cases": args.tune_cases,
                "seed": TUNE_SEED, "steps": args.steps, "dps_steps": args.dps_steps, "grid": grids})
    tune_pde_tasks(args, tasks_on(model, x_true, pde, args), out, grids)


def build_parser():
    p = task_bench_parser(__doc__, MODEL, cases=20, tasks=TASKS, methods=DEFAULT_METHODS, dps_steps=200,
                          tune_methods="diffusion_pde,fast,dps",
                          grid_example='{"inverse": {"dps": {"zeta": [100, 1000]}}}')
    p.add_argument("--steps", type=int, default=100,
                   help="steps of diffusion_pde (2 evaluations each, 199 in all for 100) and fast (1 each)")
    p.add_argument("--noise", type=float, default=0.0, help="observation noise (physical units; paper: 0)")
    p.add_argument("--completion", default="auto", choices=["auto", "solve", "off"],
                   help="physics completion of the samples, as in a request (off: u as sampled)")
    return p


def main(argv=None) -> None:
    task_bench_main(build_parser(), MODEL, main_run, tune, argv)


if __name__ == "__main__":
    main()
