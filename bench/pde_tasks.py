"""Validation of the poisson-64 and helmholtz-64 priors on DiffusionPDE's forward and inverse tasks (Huang et al., NeurIPS 2024).

    .venv/bin/python bench/pde_tasks.py --model poisson-64              # full: 20 cases, both tasks, all methods
    .venv/bin/python bench/pde_tasks.py --model helmholtz-64 --cases 5 --update-card
    .venv/bin/python bench/pde_tasks.py --model poisson-64 --tune       # small grid on 3 tuning cases
    .venv/bin/python bench/pde_tasks.py --model poisson-64 --tuned bench/results/poisson-64-tune.json
    .venv/bin/python bench/pde_tasks.py --model checkpoints/poisson-64 --smoke   # 2 cases, few steps, no file

``--model`` is a model id under ``checkpoints/`` or a checkpoint folder; its card's ``pde`` block
(kind ``poisson`` or ``helmholtz``, ``a_scale``, ``k``) sets the problem. Results go to
``bench/results/<model>-tasks.json``, ``--tune`` output to ``bench/results/<model>-tune.json``.

Problem (DESIGN.md "Poisson and Helmholtz"): 64 x 64 nodes on [0, 1]^2, channels ``a`` (source)
and ``u`` (solution); Poisson ``laplace(u) = a``, Helmholtz ``laplace(u) + k^2 u = a`` (k = 1),
5-point Laplacian over ``h^2``, ``u = 0`` on the boundary; ``a`` a GRF (alpha 2, tau 3).

Cases: held-out pairs (``bench.common.held_out_pde``, seed ``HELD_OUT_SEED``; training used seed
0) with the *training* set's source scale (the card's ``pde.a_scale``, so ``a`` has about unit
std), ``u`` the exact discrete solution. 500 random nodes of the grid (``darcy_tasks``' seeded set,
boundary nodes included) are observed without noise:

* ``forward``: ``a`` at the 500 nodes -> recover ``u``; headline: relative L2 error of ``u``;
* ``inverse``: ``u`` at the 500 nodes -> recover ``a``; headline: relative L2 error of ``a``.

Every method is scored on: ``u_rel`` and ``a_rel`` (relative L2 over all nodes of the returned
fields), ``a_rel_int`` (``a`` over interior nodes only: ``u`` does not depend on the boundary
values of ``a`` at all, so the inverse task cannot see them), ``pde_res`` (the operator's
``relative_residual`` of the returned (a, u): ``||L u - a||`` over interior nodes, plus the
boundary values of ``u``, over ``||a_interior||``), and ``u_solve_rel``: relative L2 of the
exact solve from the returned ``a`` against the true ``u`` (for the inverse: is the recovered
``a`` physically right, whatever the sampled ``u``). In the forward task the samples get the
service's physics completion (``--completion auto``: ``u`` re-solved from the sampled ``a``, as a
request returns it), so there ``u_rel = u_solve_rel`` and ``pde_res`` is round-off;
``u_sampled`` is the network's own ``u`` before the solve.

Methods (``--methods``, comma-separated ``name[+pde][:param=value...]``, values JSON; as in
``darcy_tasks.py``): ``diffusion_pde`` (EDM Heun, ``--steps 100`` -> 199 evaluations; per-channel
``zeta_obs=[zeta_a,zeta_u]`` and ``zeta_pde``, the PDE term always attached), ``fast`` (1 a step;
``fast+pde`` adds the PDE term), ``dps`` (``--dps-steps``, default 200), ``classical``:

* forward: ``a`` interpolated linearly from the 500 nodes (``scipy.interpolate.griddata``,
  nearest neighbour outside their convex hull), then ``u`` the exact solve;
* inverse: ``u`` interpolated linearly from the 500 nodes *and* the boundary condition (``u = 0``
  at every boundary node, known a priori), then ``a`` = the discrete operator applied to it
  (``laplace(u) [+ k^2 u]``, the residual operator with ``a = 0``) at interior nodes, boundary
  nodes copied from their nearest interior neighbour. The Laplacian of a piecewise-linear
  interpolant is zero inside its triangles and spikes on their edges: this route is expected to
  be bad, and is reported as it comes out.

Parameters start from ``DEFAULTS``; a ``--tune`` output passed with ``--tuned`` overrides them;
parameters in ``--methods`` override both. The scales differ from Darcy's: here ``a`` has unit
std (network scale ~2) and ``u`` std ~0.016 (network scale ~0.032), and the PDE residual is in
units of ``a`` with a ``1/h^2`` Laplacian (Darcy's residual carries ``h^2``), so ``zeta_pde`` is
thousands of times smaller than Darcy's. ``DEFAULTS`` were set by that scaling from
``darcy_tasks``' values before any tuning.

Honest notes: with ``k = 1`` the Helmholtz term ``k^2 u`` is small next to the Laplacian (whose
smallest eigenvalue on this domain is ``2 pi^2 ~ 19.7``): helmholtz-64's ``u`` is Poisson's within
about 5 %, and the two models share their ``a`` data (same seed). The priors were validated while
still training (the card's ``training.steps`` and the weights hash are in the results file).
``--tune`` cost on 2 shared CPU cores forced short tuning runs (see the README section for what
was run): the tuned values are coarse.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import classical  # noqa: E402
from bench.common import (repo_path, CHECKPOINTS, HELD_OUT_SEED, RESULTS, TUNE_SEED, PdeTasks,  # noqa: E402
                          check_held_out, environment, fmt, held_out_pde, pde_tasks_on, model_info,
                          previous_tuning, run_pde_tasks, run_task_method, set_threads, task_bench_parser,
                          tune_pde_tasks, update_card, validation_summary)
from bench.darcy_tasks import task_problem  # noqa: E402
from models.checkpoint import CARD, load_checkpoint  # noqa: E402
from operators.spec import build_pde  # noqa: E402

MODELS = ("poisson-64", "helmholtz-64")
KINDS = ("poisson", "helmholtz")
N_OBS = 500
TASKS = ("forward", "inverse")
DEFAULT_METHODS = "diffusion_pde,fast,fast+pde,dps,classical"
HEADLINE = {"forward": "u_rel", "inverse": "a_rel"}
#: --smoke: 2 cases, few steps, 1 value per tuning parameter, no results file unless --out is given.
SMOKE = {"cases": 2, "tune_cases": 2, "steps": 3, "dps_steps": 6}
#: Starting parameters per task (before tuning; Darcy's values rescaled, see the module docstring).
DEFAULTS = {
    "forward": {"diffusion_pde": {"zeta_obs": [10.0, 0.0], "zeta_pde": 0.03},
                "fast": {"zeta_obs": 10.0, "cg_iters": 5}, "fast+pde": {"zeta_obs": 10.0, "zeta_pde": 0.1, "cg_iters": 5},
                "dps": {"zeta": 1.0}, "dps+pde": {"zeta": 1.0, "zeta_pde": 0.03}},
    "inverse": {"diffusion_pde": {"zeta_obs": [0.0, 3000.0], "zeta_pde": 0.03},
                "fast": {"zeta_obs": 3e4, "cg_iters": 5}, "fast+pde": {"zeta_obs": 3e4, "zeta_pde": 0.1, "cg_iters": 5},
                "dps": {"zeta": 100.0}, "dps+pde": {"zeta": 100.0, "zeta_pde": 0.03}},
}
#: --tune grids (per task; a list of values per parameter). Parameters a grid leaves out come from DEFAULTS.
TUNE_GRID = {
    "forward": {"diffusion_pde": {"zeta_obs": [[10.0, 0.0], [30.0, 0.0], [100.0, 0.0]], "zeta_pde": [0.03]},
                "fast": {"zeta_obs": [30.0, 100.0, 300.0]},
                "fast+pde": {"zeta_pde": [0.01, 0.1, 1.0]},
                "dps": {"zeta": [3.0, 10.0, 30.0]}},
    "inverse": {"diffusion_pde": {"zeta_obs": [[0.0, 300.0], [0.0, 1000.0], [0.0, 3000.0]], "zeta_pde": [0.03]},
                "fast": {"zeta_obs": [1e5, 1e6]},
                "fast+pde": {"zeta_pde": [0.01, 0.1, 1.0]},
                "dps": {"zeta": [300.0, 1000.0, 3000.0]}},
}
METRIC_KEYS = ("u_rel", "a_rel", "a_rel_int", "pde_res", "u_solve_rel")


# ----------------------------------------------------------------------------- model and problem
def resolve_model(spec: str):
    """``(model, folder)`` for a model id under ``checkpoints/`` or a checkpoint folder; the card
    must describe a Poisson or Helmholtz prior with ``pde.a_scale``."""
    folder = Path(spec)
    if not (folder / CARD).is_file():
        folder = CHECKPOINTS / spec
    if not (folder / CARD).is_file():
        raise SystemExit(f"no checkpoint {spec!r}: neither {spec}/{CARD} nor {folder}/{CARD} exists "
                         f"(use one of {', '.join(MODELS)} once trained, or a checkpoint folder)")
    model = load_checkpoint(folder)
    p = model.card.get("pde") or {}
    if p.get("kind") not in KINDS or not p.get("a_scale"):
        raise SystemExit(f"{folder}: card pde block {p!r} is not a Poisson/Helmholtz prior with a_scale")
    if tuple(model.card["shape"][:1]) != (2,) or model.card["shape"][-1] ** 2 <= N_OBS:
        raise SystemExit(f"{folder}: shape {model.card['shape']} is not (2, n, n) with n^2 > {N_OBS}")
    return model, folder


def held_out(model, num: int, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """``[num, 2, n, n]`` float64 held-out pairs of the model's PDE at its training source scale."""
    p = model.card["pde"]
    return held_out_pde(p["kind"], num, float(p["a_scale"]), seed=seed, n=model.card["shape"][-1])


def model_pde(model):
    return build_pde({"kind": model.card["pde"]["kind"]}, tuple(model.card["shape"]), model.card["pde"])


def source_of(u: np.ndarray, pde) -> np.ndarray:
    """The discrete operator applied to ``u [n, n]``: ``a = laplace(u) [+ k^2 u]`` at interior nodes
    (the residual operator with ``a = 0``, so exactly its stencil); boundary nodes, where the PDE
    says nothing of ``a``, copied from their nearest interior node."""
    ut = torch.as_tensor(np.asarray(u, dtype=np.float64))[None]
    inner = pde.interior_residual(torch.zeros_like(ut), ut)[0].numpy()
    return np.pad(inner, 1, mode="edge")


def classical_baseline(task: str, y: torch.Tensor, rows, cols, pde) -> tuple[np.ndarray, str]:
    """Forward: ``a`` interpolated, ``u`` solved; inverse: ``u`` interpolated (with ``u = 0`` on the
    boundary), ``a`` from the discrete operator (module docstring)."""
    n = pde.n
    rows, cols = np.asarray(rows), np.asarray(cols)
    bd = np.zeros((n, n), dtype=bool)
    bd[[0, -1], :] = bd[:, [0, -1]] = True
    seen = np.zeros((n, n), dtype=bool)
    seen[rows, cols] = True
    br, bc = np.nonzero(bd & ~seen)  # boundary nodes not observed: u = 0 there by the BC
    out = np.zeros((len(y), 2, n, n))
    for i in range(len(y)):
        v = y[i].numpy()
        if task == "forward":
            a = classical.interpolate_points(v, rows, cols, n, "linear")
            out[i, 0], out[i, 1] = a, pde.solution_of(a)
        else:
            u = classical.interpolate_points(np.concatenate([v, np.zeros(len(br))]), np.concatenate([rows, br]),
                                             np.concatenate([cols, bc]), n, "linear")
            out[i, 0], out[i, 1] = source_of(u, pde), u
    name = ("a: linear interpolation of the observed values (nearest outside their hull); u: exact solve"
            if task == "forward" else
            "u: linear interpolation of the observed values and u = 0 on the boundary; "
            "a: the discrete operator applied to u (interior), boundary copied from the nearest interior node")
    return out, name


def _rel(x, ref) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def metrics(x: np.ndarray, x_true: np.ndarray, pde) -> dict:
    """Per-case metrics (lists) of recovered fields ``x [B, 2, n, n]`` (physical units)."""
    out = {k: [] for k in METRIC_KEYS}
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    res = pde.relative_residual(torch.as_tensor(np.nan_to_num(x), dtype=torch.float64)).numpy()
    for i in range(len(x)):
        if not finite[i]:
            for v in out.values():
                v.append(float("nan"))
            continue
        (a, u), (at, ut) = x[i], x_true[i]
        out["u_rel"].append(_rel(u, ut))
        out["a_rel"].append(_rel(a, at))
        out["a_rel_int"].append(_rel(a[1:-1, 1:-1], at[1:-1, 1:-1]))
        out["pde_res"].append(float(res[i]))
        out["u_solve_rel"].append(_rel(pde.solution_of(a), ut))
    return out


# ----------------------------------------------------------------------------- running
def run_method(model, task, op, y, x_true, rows, cols, name, params, pde, noise=0.0, verbose=True,
               completion="auto") -> dict:
    """Score one method on a task's batch (``bench.common.run_task_method``)."""
    return run_task_method(model, op, y, name, params, pde, metrics=lambda x: metrics(x, x_true, pde),
                           baseline=lambda: classical_baseline(task, y, rows, cols, pde), label=task,
                           noise=noise, verbose=verbose, completion=completion)


def row_text(task: str, label: str, e: dict) -> str:
    return (f"{task:8s} {label:44s} {fmt(e['u_rel_mean'], '.4f'):>7s} {fmt(e['a_rel_mean'], '.4f'):>7s} "
            f"{fmt(e['a_rel_int_mean'], '.4f'):>7s} {fmt(e.get('u_rel_sampled_mean'), '.4f'):>9s} "
            f"{fmt(e['u_solve_rel_mean'], '.4f'):>8s} {fmt(e['pde_res_mean'], '.3g'):>8s} {e['nfe']:>5d} "
            f"{e['seconds']:>8.1f}" + ("  DIVERGED" if e.get("diverged") else ""))


TABLE_HEAD = (f"{'task':8s} {'method':44s} {'u_rel':>7s} {'a_rel':>7s} {'a_int':>7s} {'u_sampled':>9s} "
              f"{'u_solve':>8s} {'pde_res':>8s} {'nfe':>5s} {'seconds':>8s}")


def tasks_on(model, x_true: np.ndarray, pde, args) -> PdeTasks:
    """The shared run / tune loops' view of these cases."""
    return pde_tasks_on(model, x_true, pde, args, task_problem=task_problem, run_method=run_method,
                        defaults=DEFAULTS, row_text=row_text, head=TABLE_HEAD, headline=HEADLINE,
                        sane_keys=("u_rel", "a_rel", "pde_res"))


def main_run(args, model, folder: Path) -> dict:
    """The validation run; returns the results (also merged into ``args.out`` unless it is '')."""
    tuned = json.loads(Path(args.tuned).read_text())["best"] if args.tuned else {}
    x_true = held_out(model, args.cases)
    print(f"held-out check: {check_held_out(x_true, model.id)}", file=sys.stderr)
    pde = model_pde(model)
    info = model_info(model, folder)
    header = {"benchmark": "bench/pde_tasks.py", "model": info, "pde": model.card["pde"], "cases": args.cases,
              "held_out_seed": HELD_OUT_SEED, "observed_nodes": N_OBS, "noise_sigma": args.noise,
              "tuned_from": repo_path(args.tuned), "environment": environment(torch.get_num_threads()),
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "completion": args.completion, "smoke": bool(args.smoke),
              "metrics_note": ("u_rel, a_rel: relative L2 over all nodes of u and a as returned (after physics "
                               "completion where it applied: u re-solved from the sampled a); a_rel_int: a over "
                               "interior nodes (u does not depend on boundary a); u_rel_sampled: u before "
                               "completion; pde_res: the operator's relative residual of (a, u) as returned; "
                               "u_solve_rel: relative L2 of the exact solve from the returned a vs true u; "
                               "one posterior sample per case"),
              "ground_truth_pde_res": float(pde.relative_residual(torch.as_tensor(x_true)).max())}
    print(f"{model.id} ({folder}): training steps {info['training_steps']}, weights {info['weights_sha256_16']}, "
          f"{args.cases} cases, {N_OBS} observed nodes", file=sys.stderr)
    rows_out, data = run_pde_tasks(args, tasks_on(model, x_true, pde, args), header, tuned,
                                   info["training_steps"])
    print(f"\n{model.id}\n{TABLE_HEAD}")
    for r in rows_out:
        print(row_text(*r))
    if args.update_card:
        if not args.out:
            raise SystemExit("--update-card needs a results file (--out)")
        write_card_validation(json.loads(Path(args.out).read_text()), folder)
        print(f"wrote the validation summary into {folder / CARD}", file=sys.stderr)
    return data


def card_validation(data: dict) -> dict:
    """The card's ``validation`` block from a results file (means per task and method)."""
    return validation_summary(data, ("u_rel_mean", "a_rel_mean", "a_rel_int_mean", "u_rel_sampled_mean",
                                     "u_solve_rel_mean", "pde_res_mean"))


def write_card_validation(data: dict, folder: Path) -> dict:
    """Write ``card_validation(data)`` into the card of the checkpoint ``folder`` (only that key)."""
    folder = Path(folder)
    return update_card(folder.name, validation=card_validation(data), root=folder.parent)


def tune(args, model, folder: Path) -> dict:
    x_true = held_out(model, args.tune_cases, seed=TUNE_SEED)
    pde = model_pde(model)
    grids = {t: dict(g) for t, g in TUNE_GRID.items()}
    for t, g in (json.loads(args.grid) if args.grid else {}).items():
        grids[t].update(g)
    if args.smoke:  # one value per parameter
        grids = {t: {m: {k: v[:1] for k, v in g.items()} for m, g in gm.items()} for t, gm in grids.items()}
    out = previous_tuning(args.tune_out)
    out.update({"benchmark": "bench/pde_tasks.py --tune", "model": model_info(model, folder),
                "cases": args.tune_cases, "seed": TUNE_SEED, "steps": args.steps, "dps_steps": args.dps_steps})
    for task in args.tasks.split(","):  # the grid each method was last tuned on (earlier runs' kept)
        out.setdefault("grid", {}).setdefault(task, {}).update(
            {m: grids[task][m] for m in args.tune_methods.split(",") if m in grids[task]})
    return tune_pde_tasks(args, tasks_on(model, x_true, pde, args), out, grids)


def build_parser() -> argparse.ArgumentParser:
    p = task_bench_parser(__doc__, "<model>", cases=20, tasks=TASKS, methods=DEFAULT_METHODS, dps_steps=200,
                          tune_methods="diffusion_pde,fast,fast+pde,dps",
                          grid_example='{"inverse": {"dps": {"zeta": [30, 300]}}}')
    p.set_defaults(out=None, tune_out=None)  # defaults follow --model (resolved in main)
    p.add_argument("--model", default=MODELS[0],
                   help=f"model id under checkpoints/ ({', '.join(MODELS)}) or a checkpoint folder")
    p.add_argument("--steps", type=int, default=100,
                   help="steps of diffusion_pde (2 evaluations each, 199 in all for 100) and fast (1 each)")
    p.add_argument("--noise", type=float, default=0.0, help="observation noise (physical units; paper: 0)")
    p.add_argument("--completion", default="auto", choices=["auto", "solve", "off"],
                   help="physics completion of the samples, as in a request (off: u as sampled)")
    p.add_argument("--smoke", action="store_true",
                   help=f"quick check: {SMOKE['cases']} cases, --steps {SMOKE['steps']}, --dps-steps "
                        f"{SMOKE['dps_steps']}, one value per tuning parameter; no file unless --out/--tune-out")
    p.epilog = "--out default: bench/results/<model>-tasks.json; --tune-out default: bench/results/<model>-tune.json"
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    model, folder = resolve_model(args.model)
    if args.smoke:
        if args.update_card and folder.resolve().parent == CHECKPOINTS.resolve():
            raise SystemExit(f"--smoke --update-card would put smoke numbers into {folder / CARD}; leave one out")
        args.cases, args.tune_cases = SMOKE["cases"], SMOKE["tune_cases"]
        args.steps, args.dps_steps = SMOKE["steps"], SMOKE["dps_steps"]
        args.out = args.out or ""
        args.tune_out = args.tune_out or ""
    if args.out is None:
        args.out = str(RESULTS / f"{model.id}-tasks.json")
    if args.tune_out is None:
        args.tune_out = str(RESULTS / f"{model.id}-tune.json")
    return tune(args, model, folder) if args.tune else main_run(args, model, folder)


if __name__ == "__main__":
    main()
