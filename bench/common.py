"""Shared pieces of the validation benchmarks: held-out data, batched solving, results files, cards.

Held-out data. Training used ``seed = 0`` (``card["training"]["data_seed"]``); the benchmarks
draw their cases with ``HELD_OUT_SEED`` and tune parameters on ``TUNE_SEED`` cases, so neither
the reported numbers nor the tuning see a training example. ``models.data`` draws every
example from ``numpy.random.default_rng(seed)``: different seeds are independent streams
(NumPy's ``SeedSequence``), and ``check_held_out`` confirms that no held-out example equals
a training example when the training set is at hand (``runs/<id>/data.npy``).

Batched solving. ``solve`` takes one observation; ``run_batched`` runs the same solve path
(``guidance.solve.solve_batch``, without its finishing) with one item per case, each with its own seeded random
stream, so a case gets the same result whatever batch it runs in. ``nfe`` counts batched
network calls, i.e. the evaluations each case paid for.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guidance.core import DivergedError  # noqa: E402
from guidance.registry import METHODS  # noqa: E402
from guidance.solve import SolveItem, make_plan, solve_batch  # noqa: E402
from models.checkpoint import CARD, WEIGHTS, load_checkpoint  # noqa: E402

CHECKPOINTS = ROOT / "checkpoints"
RESULTS = ROOT / "bench" / "results"
HELD_OUT_SEED = 1000003  # reported cases
TUNE_SEED = 2000003  # parameter tuning cases (disjoint from the reported ones)
OBS_SEED = 424242  # observation noise, random masks and observed nodes


# ----------------------------------------------------------------------------- models and data
def load_model(model_id: str, device: str = "cpu"):
    """``checkpoints/<model_id>`` as a ``LoadedModel`` (the current export of a running training)."""
    return load_checkpoint(CHECKPOINTS / model_id, device)


def weights_digest(model_id: str, folder: Path | None = None) -> str:
    """First 16 hex digits of the weights' sha256: ties a result to the exact export it used
    (``checkpoints/<model_id>``, or the checkpoint ``folder`` when given)."""
    h = hashlib.sha256((Path(folder or CHECKPOINTS / model_id) / WEIGHTS).read_bytes())
    return h.hexdigest()[:16]


def model_info(model, folder: Path | None = None) -> dict:
    tr = model.card.get("training") or {}
    return {"id": model.id, "training_steps": tr.get("steps"), "training_updated": tr.get("updated"),
            "final_loss": tr.get("final_loss"), "weights_sha256_16": weights_digest(model.id, folder)}


def held_out_phantoms(num: int, seed: int = HELD_OUT_SEED, n: int = 64) -> np.ndarray:
    """``[num, 1, n, n]`` float32 phantoms in [0, 1] from a seed other than the training one."""
    from models.data import phantoms

    return phantoms(num, n, seed)


def held_out_darcy(num: int, seed: int = HELD_OUT_SEED, n: int = 64) -> np.ndarray:
    """``[num, 2, n, n]`` float64 Darcy pairs (a, u), u the exact discrete solution."""
    from models.data import darcy_pairs

    return darcy_pairs(num, n, seed, dtype=np.float64)


def held_out_pde(kind: str, num: int, a_scale: float, seed: int = HELD_OUT_SEED, n: int = 64) -> np.ndarray:
    """``[num, 2, n, n]`` float64 Poisson/Helmholtz pairs (a, u) with the *training* set's source
    scale: ``a = g * a_scale`` (``a_scale`` from the card's ``pde`` block), ``u`` the exact
    discrete solution. ``models.data.pde_pairs`` would scale ``g`` to unit std over these few
    cases instead (a few % off the training scale); the GRF draws are the same (same seed, same
    order), only the factor differs."""
    from models.data import grf_coefficient
    from operators.pde import solve_helmholtz, solve_poisson

    if kind not in ("poisson", "helmholtz"):
        raise ValueError(f"held_out_pde: kind must be poisson or helmholtz, got {kind!r}")
    solve = solve_poisson if kind == "poisson" else solve_helmholtz
    a = grf_coefficient(n, np.random.default_rng(seed), num=num) * float(a_scale)
    return np.stack([np.stack([ai, solve(ai)]) for ai in a])


def check_held_out(x: np.ndarray, model_id: str) -> str:
    """Confirm that no case equals a training example (first channel compared exactly).

    Uses the training set the run wrote (``runs/<model_id>/data.npy``) if present; returns
    a one-line verdict (raises if a case was found in the training set).
    """
    path = ROOT / "runs" / model_id / "data.npy"
    if not path.exists():
        return f"training set {path} not found; relying on distinct seeds"
    train = np.load(path, mmap_mode="r")
    keys = {np.ascontiguousarray(train[i, 0], dtype=np.float32).tobytes() for i in range(len(train))}
    hits = [i for i in range(len(x)) if np.ascontiguousarray(x[i, 0], dtype=np.float32).tobytes() in keys]
    if hits:
        raise RuntimeError(f"held-out cases {hits} appear in the training set of {model_id}")
    return f"no case among the {len(train)} training examples of {model_id}"


# ----------------------------------------------------------------------------- methods
def parse_method(spec: str) -> tuple[str, str, dict]:
    """``"fast:steps=50:lam=0.5"`` -> ``(label, name, params)``; values are JSON (lists allowed)."""
    name, *kv = spec.split(":")
    params = {}
    for item in kv:
        k, _, v = item.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return spec, name, params


def split_name(name: str) -> tuple[str, bool]:
    """``"fast+pde"`` -> ``("fast", True)``; diffusion_pde always carries the PDE term."""
    base, _, flag = name.partition("+")
    if flag not in ("", "pde"):
        raise ValueError(f"unknown method suffix in {name!r}; use name or name+pde")
    return base, bool(flag) or base == "diffusion_pde"


def run_batched(model, operator, y, *, method: str, params: dict | None = None, noise_sigma: float = 0.0,
                pde=None, seeds=None, callback=None) -> dict:
    """Solve a batch of observations ``y [B, *obs_shape]`` (physical units) sharing one operator.

    Returns ``{"x": [B, C, H, W] float64 numpy (physical), "nfe", "seconds", "config", "diverged"}``;
    a sampler that diverges gives NaNs and ``diverged = True`` instead of raising.
    """
    plan = make_plan(method, params, model.denoiser)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    seeds = list(range(len(y))) if seeds is None else [int(s) for s in seeds]
    t0 = time.perf_counter()
    diverged = False
    try:  # the samples alone: the benches complete and score them (run_task_method)
        run = solve_batch(model, plan, [SolveItem(operator, yi, 1, s) for yi, s in zip(y, seeds)],
                          noise_sigma=noise_sigma, pde=pde, callback=callback, finishing=False)
        x, nfe = torch.cat([it.samples for it in run.items]).numpy(), run.nfe
    except DivergedError as e:
        diverged, nfe = True, e.nfe
        x = np.full((len(y),) + tuple(model.card["shape"]), np.nan)
    config = {k: v for k, v in plan.describe().items() if k != "name"}
    return {"x": x, "nfe": nfe, "seconds": time.perf_counter() - t0, "config": config,
            "diverged": diverged}


def run_samples(model, operator, y, k: int, *, seed0: int = 0, **kwargs) -> dict:
    """``run_batched`` with ``k`` posterior samples per observation, as one batch: ``x`` is
    ``[k, B, C, H, W]``, sample ``j`` of case ``i`` drawn with seed ``seed0 + i + 1000 j`` (so
    ``k = 1`` draws what ``run_batched`` with seeds ``seed0 + i`` does)."""
    b = len(y)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    r = run_batched(model, operator, y.repeat(k, *([1] * (y.dim() - 1))),
                    seeds=[seed0 + i + 1000 * j for j in range(k) for i in range(b)], **kwargs)
    r["x"] = r["x"].reshape((k, b) + r["x"].shape[1:])
    return r


def run_task_method(model, op, y, name: str, params: dict, pde, *, metrics, baseline, label: str = "",
                    noise: float = 0.0, verbose: bool = True, completion: str = "auto") -> dict:
    """Score one method of a PDE task bench (``darcy_tasks.py``, ``pde_tasks.py``) on a batch.

    ``name``: ``classical`` (``baseline()`` gives ``(x [B, C, n, n], description)``) or a method
    ``name[+pde]`` (``split_name``) run with ``params`` (``samples=K``: the mean of K samples per
    case). Samples get the service's physics completion (``completion``; see
    ``guidance.solve.complete_with_physics``), so the figures are what a request returns; where
    it applied, ``u_rel_sampled``/``pde_res_sampled`` score the samples before it.
    ``metrics(x) -> {key: [per case]}`` scores physical fields; the entry holds those lists and
    their ``<key>_mean``. ``label`` prefixes the progress lines.
    """
    from guidance.solve import complete_with_physics

    shape = tuple(model.card["shape"])
    if name == "classical":
        t0 = time.perf_counter()
        x, info = baseline()
        e = {"method": "classical", "baseline": info, "nfe": 0, "seconds": time.perf_counter() - t0,
             "diverged": False}
    else:
        base, with_pde = split_name(name)
        params = dict(params)
        k = int(params.pop("samples", 1))  # k > 1: score the mean of k samples (a request's mean)
        cb = progress_printer(f"{label} {name}") if verbose else None
        r = run_samples(model, op, y, k, method=base, params=params, noise_sigma=noise,
                        pde=pde if with_pde else None, callback=cb)
        e = {"method": base, "pde_term": with_pde, "params": r["config"], "nfe": r["nfe"],
             "seconds": r["seconds"], "diverged": r["diverged"], **({"samples": k} if k > 1 else {})}
        x, done = complete_with_physics(torch.as_tensor(r["x"].reshape((-1,) + shape)), op, pde, completion,
                                        (model.card.get("pde") or {}).get("a_levels"))
        e["completed"] = done
        x = x.numpy().reshape(r["x"].shape).mean(0)
        if done:  # the sampled u, before the solve replaced it
            raw = metrics(r["x"].mean(0))
            e.update({"u_rel_sampled": raw["u_rel"], "pde_res_sampled": raw["pde_res"],
                      "u_rel_sampled_mean": finite_mean(raw["u_rel"]),
                      "pde_res_sampled_mean": finite_mean(raw["pde_res"])})
    m = metrics(x)
    e.update(m)
    e.update({f"{key}_mean": finite_mean(v) for key, v in m.items()})
    return e


def add_noise(y: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- results files
def environment(threads: int, loadavg: bool = False) -> dict:
    """What a result was measured on; ``loadavg``: with the 1-minute load average (the service
    benches, whose times depend on what else runs)."""
    env = {"torch": torch.__version__, "threads": threads, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if loadavg:
        env["loadavg_1m"] = os.getloadavg()[0]
    return env


def repo_path(path) -> str | None:
    """``path`` relative to the repository when inside it: what a results file records."""
    if not path:
        return None
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def atomic_write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def merge_result(path: Path, header: dict, task: str, task_info: dict, label: str, entry: dict | None) -> None:
    """Add one (task, method) entry to the results file, re-reading it first (runs may share it).

    Entries of a file made with other cases or other weights are not mixed in: that file is moved
    aside to ``<name>.previous.json`` and a new one started.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs (e.g. dps and the rest) share the file
        _merge_locked(path, header, task, task_info, label, entry)


def _merge_locked(path: Path, header: dict, task: str, task_info: dict, label: str, entry: dict | None) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    same = {k: data.get(k) for k in ("cases", "benchmark")} == {k: header.get(k) for k in ("cases", "benchmark")}
    if data and (not same or (data.get("model") or {}).get("weights_sha256_16")
                 != (header.get("model") or {}).get("weights_sha256_16")):
        old = path.with_name(path.stem + ".previous.json")
        print(f"{path}: other cases or weights than this run; moved to {old.name}, starting afresh",
              file=sys.stderr)
        path.replace(old)
        data = {}
    data.update(header)
    t = data.setdefault("tasks", {}).setdefault(task, {})
    t.update(task_info)
    if entry is not None:
        t.setdefault("methods", {})[label] = entry
    atomic_write_json(path, data)


def previous_tuning(path) -> dict:
    """An existing ``--tune`` output to extend (a method tuned again replaces its entries), or a new one."""
    path = Path(path) if path else None
    data = json.loads(path.read_text()) if path and path.exists() else {}
    data.setdefault("results", {})
    data.setdefault("best", {})
    return data


def finite_mean(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return None if not np.isfinite(v).all() else float(v.mean())


def fmt(v, spec: str = ".2f") -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


# ----------------------------------------------------------------------------- model cards
def validation_summary(data: dict, keys) -> dict:
    """The card's ``validation`` block from a task bench's results file: per task and method the
    ``<key>_mean`` values of ``keys`` (named without ``_mean``, 4 decimals), nfe and samples."""
    return {"benchmark": data["benchmark"], "updated": data["updated"], "cases": data["cases"],
            "observed_nodes": data["observed_nodes"], "training_steps": data["model"]["training_steps"],
            "weights_sha256_16": data["model"]["weights_sha256_16"],
            "tasks": {t: {"headline": d.get("headline"),
                          "methods": {lab: {**{k[:-5]: (round(e[k], 4) if e.get(k) is not None else None)
                                               for k in keys},
                                            "nfe": e["nfe"], **({"samples": e["samples"]} if "samples" in e else {})}
                                      for lab, e in d.get("methods", {}).items()}}
                      for t, d in data["tasks"].items()}}


def update_card(model_id: str, methods=None, validation=None, root: Path | None = None) -> dict:
    """Set the ``methods`` and/or ``validation`` keys of ``checkpoints/<id>/card.json``.

    Only these two keys are written; every other key is kept as read. The card is re-read
    right before writing and replaced atomically (a temporary file of our own name, then
    ``os.replace``), so a concurrent training export either comes before (and is kept) or
    after (and keeps these two keys, as the trainer does).
    """
    card_path = Path(root or CHECKPOINTS) / model_id / CARD
    card = json.loads(card_path.read_text())
    if methods is not None:
        if not isinstance(methods, list) or not all(isinstance(m, dict) and m.get("name") in METHODS
                                                    for m in methods):
            raise ValueError(f"methods must be a list of {{'name': one of {sorted(METHODS)}, ...params}}")
        for m in methods:  # parameters must be valid for the method
            METHODS[m["name"]].make_config({k: v for k, v in m.items() if k != "name"})
        card["methods"] = methods
    if validation is not None:
        card["validation"] = validation
    tmp = card_path.with_name(f".{CARD}.{os.getpid()}.bench.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, card_path)
    return card


def set_threads(n: int) -> int:
    if n and n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- the task benches
def task_bench_parser(doc: str, model_id: str, *, cases: int, tasks, methods: str, dps_steps: int,
                      tune_methods: str, grid_example: str) -> argparse.ArgumentParser:
    """The arguments ``phantom_tasks.py`` and ``darcy_tasks.py`` share; each adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--cases", type=int, default=cases)
    p.add_argument("--tasks", default=",".join(tasks))
    p.add_argument("--methods", default=methods)
    p.add_argument("--dps-steps", type=int, default=dps_steps)
    p.add_argument("--out", default=str(RESULTS / f"{model_id}.json"), help="results JSON ('' for none)")
    p.add_argument("--tuned", default=None, help="a --tune output whose best parameters to use per task")
    p.add_argument("--update-card", action="store_true",
                   help="write the summary of --out into the card's 'validation' key")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tune", action="store_true", help="grid-search the method parameters instead")
    p.add_argument("--tune-cases", type=int, default=3)
    p.add_argument("--tune-methods", default=tune_methods)
    p.add_argument("--tune-out", default=str(RESULTS / f"{model_id}-tune.json"))
    p.add_argument("--grid", default=None, help=f"JSON replacing parts of TUNE_GRID, e.g. '{grid_example}'")
    return p


def task_bench_main(parser: argparse.ArgumentParser, model_id: str, main_run, tune, argv=None) -> None:
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model = load_model(model_id)
    (tune if args.tune else main_run)(args, model)


def grid_search(grid: dict, evaluate, maximize: bool) -> tuple[dict | None, list[dict]]:
    """Evaluate every combination of ``grid``'s values (``{name: [values]}``). ``evaluate(params)``
    returns ``(score or None, record)``. Returns the best-scoring params (the first of equals;
    None when nothing scored) and one record per combination, params included."""
    keys = list(grid)
    scored, records = [], []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        score, record = evaluate(params)
        records.append({**params, **record})
        if score is not None:
            scored.append((score, params))
    pick = max if maximize else min
    return (pick(scored, key=lambda t: t[0])[1] if scored else None), records


@dataclasses.dataclass
class PdeTasks:
    """What a PDE task bench (``darcy_tasks.py``, ``pde_tasks.py``) plugs into the shared run and
    tune loops, for one set of cases: ``problem(task) -> (op, y, rows, cols)``;
    ``run(task, problem, name, params) -> metrics`` (params as resolved by ``params``);
    ``params(task, name, given, tuned) -> params`` (``{}`` for ``classical``); the table's
    ``row_text(task, label, metrics)`` and ``head``; the headline metric per task; and the
    metrics that must be finite for a tuning run to score (besides ``u_rel < 1``)."""
    problem: object
    run: object
    params: object
    row_text: object
    head: str
    headline: dict
    sane_keys: tuple


def pde_tasks_on(model, x_true: np.ndarray, pde, args, *, task_problem, run_method, defaults: dict, row_text,
                 head: str, headline: dict, sane_keys: tuple) -> PdeTasks:
    """A PDE task bench's ``PdeTasks`` for the cases ``x_true``, from its module's pieces:
    ``task_problem(task, x_true, noise, shape=...)`` and ``run_method`` as in ``darcy_tasks.py``."""
    def run(task, prob, name, params):
        op, y, rows, cols = prob
        return run_method(model, task, op, y, x_true, rows, cols, name, params, pde, args.noise,
                          verbose=not args.quiet and not args.tune, completion=args.completion)

    shape = tuple(model.card["shape"])
    return PdeTasks(problem=lambda task: task_problem(task, x_true, args.noise, shape=shape)[1:], run=run,
                    params=lambda task, name, given, tuned: method_params(defaults, name, given, task, tuned,
                                                                          args.steps, args.dps_steps),
                    row_text=row_text, head=head, headline=headline, sane_keys=sane_keys)


def method_params(defaults: dict, name: str, params: dict, task: str, tuned: dict, steps: int,
                  dps_steps: int) -> dict:
    """A method's parameters for ``task``: the step count (``dps_steps`` for DPS), then the bench's
    ``defaults``, the ``--tuned`` best, and those given in ``--methods``, each overriding the last."""
    if name == "classical":
        return {}
    base, _ = split_name(name)
    start = {"steps": dps_steps if base == "dps" else steps}
    return {**start, **defaults[task].get(name, {}), **(tuned.get(task, {}).get(name) or {}), **params}


def run_pde_tasks(args, bench: PdeTasks, header: dict, tuned: dict, training_steps: int) -> tuple[list, dict]:
    """The validation loop of the PDE task benches: every ``--methods`` entry on every ``--tasks``
    task, merged into ``args.out`` (unless '') as it finishes. Returns the table rows and the results."""
    rows_out, data = [], {**header, "tasks": {}}
    for task in args.tasks.split(","):
        prob = bench.problem(task)
        task_info = {"observed": "a" if task == "forward" else "u", "headline": bench.headline[task],
                     "points_seed": OBS_SEED}
        data["tasks"][task] = {**task_info, "methods": {}}
        for spec_str in args.methods.split(","):
            label, name, params = parse_method(spec_str)
            e = bench.run(task, prob, name, bench.params(task, name, params, tuned))
            e["model_training_steps"] = training_steps
            rows_out.append((task, label, e))
            data["tasks"][task]["methods"][label] = e
            print("  " + bench.row_text(task, label, e), file=sys.stderr, flush=True)
            if args.out:
                merge_result(Path(args.out), header, task, task_info, label, e)
    return rows_out, data


def tune_pde_tasks(args, bench: PdeTasks, out: dict, grids: dict) -> dict:
    """``--tune`` of the PDE task benches: per task the classical route, then a grid search per
    ``--tune-methods`` entry over ``grids[task][name]`` minimizing the task's headline metric (a run
    whose ``u`` blew up scores nothing); ``out``'s ``results`` and ``best`` are updated and written
    to ``args.tune_out`` (unless '') after each method."""
    for task in args.tasks.split(","):
        prob, key = bench.problem(task), bench.headline[task]
        res, best = out["results"].setdefault(task, {}), out["best"].setdefault(task, {})
        print(f"\n{task} (objective {key})\n{bench.head}")
        print(bench.row_text(task, "classical", bench.run(task, prob, "classical", {})))

        def evaluate(name, params, task=task, prob=prob, key=key):
            e = bench.run(task, prob, name, bench.params(task, name, params, {}))
            print(bench.row_text(task, f"{name}:{json.dumps(params, separators=(',', ':'))}", e), flush=True)
            sane = all(e[f"{k}_mean"] is not None for k in bench.sane_keys) and e["u_rel_mean"] < 1
            return ((e[f"{key}_mean"] if sane else None),
                    {**{k: e[k] for k in e if k.endswith("_mean")}, "nfe": e["nfe"], "seconds": e["seconds"]})

        for name in args.tune_methods.split(","):
            if name not in grids[task]:
                raise SystemExit(f"no tuning grid for {name!r} in task {task!r}; give one with --grid")
            tune_method(res, best, name, grids[task][name], lambda p, name=name: evaluate(name, p), maximize=False)
            if args.tune_out:
                atomic_write_json(Path(args.tune_out), out)
    print(json.dumps(out["best"], indent=1))
    return out


def tune_method(results: dict, best: dict, name: str, grid: dict, evaluate, maximize: bool) -> None:
    """``grid_search`` one method: its records into ``results[name]``, its best parameters (if any
    scored) into ``best[name]``."""
    chosen, results[name] = grid_search(grid, evaluate, maximize)
    if chosen is not None:
        best[name] = chosen
        print(f"  best {name}: {chosen}")


def progress_printer(label: str, every: float = 0.1):
    """A sampler callback printing ``label: step i/n  seconds`` to stderr every ``every`` of the run."""
    t0 = time.perf_counter()
    last = [-1]

    def cb(ev):
        frac = (ev["i"] + 1) / ev["total"]
        if int(frac / every) > last[0]:
            last[0] = int(frac / every)
            print(f"    {label}: step {ev['i'] + 1}/{ev['total']}  {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return cb


# ----------------------------------------------------------------------------- the service benches
# http_overhead.py, batching_throughput.py, ray_throughput.py (and load_test.py's free_port).
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot_checkpoints(model_ids, dest: Path) -> dict:
    """Copy ``checkpoints/<id>/{card.json,weights}`` into ``dest/<id>``; returns id -> sha256[:16].

    A running training may re-export ``checkpoints/<id>`` at any time: a server started on the
    snapshot and this process then use the same weights. Ids without weights (the built-in
    grf-32) are skipped."""
    out = {}
    for mid in model_ids:
        src = CHECKPOINTS / mid
        if not (src / WEIGHTS).exists():
            continue
        (dest / mid).mkdir(parents=True, exist_ok=True)
        data = (src / WEIGHTS).read_bytes()  # the trainer replaces the file atomically
        (dest / mid / WEIGHTS).write_bytes(data)
        shutil.copyfile(src / CARD, dest / mid / CARD)
        out[mid] = hashlib.sha256(data).hexdigest()[:16]
    return out


class Server:
    """``reconserve serve`` as a subprocess on a free localhost port; ``with Server(...) as s:``.

    ``RECONSERVE_TORCH_THREADS`` is ``threads``; ``models_dir`` (``--models``) adds or overrides
    models (e.g. a ``snapshot_checkpoints`` folder); ``env`` more environment; ``cmd`` may be
    extended before entering (``--ray ...``). Entering waits for ``/readyz`` (``startup_s``)."""

    def __init__(self, threads: int, models_dir: Path | None = None, env: dict | None = None,
                 log_path: Path | None = None, ready_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "reconserve"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if models_dir is not None:
            cmd += ["--models", str(models_dir)]
        self.env = {**os.environ, "RECONSERVE_TORCH_THREADS": str(threads), **(env or {})}
        self.cmd, self.threads, self.ready_timeout = cmd, threads, ready_timeout
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="reconserve-bench-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        from service.client import Client

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        t0, end = time.monotonic(), time.monotonic() + self.ready_timeout
        with Client(self.url, timeout=10) as c:
            while not c.ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n"
                                       + self.log_path.read_text()[-3000:])
                if time.monotonic() > end:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"server not ready within {self.ready_timeout:g} s")
                time.sleep(0.25)
        self.startup_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_jobs(model_id: str, n: int) -> list[dict]:
    """``n`` inpainting jobs: different truths (held-out phantoms for phantom-64, prior draws for
    grf-32), masks (20 % .. 50 % observed) and seeds."""
    if model_id.startswith("phantom"):
        from models.data import phantoms
        xs = phantoms(n, 64, HELD_OUT_SEED).astype(np.float32)
    elif model_id == "grf-32":
        from models.grf import GRFDenoiser
        g = torch.Generator().manual_seed(HELD_OUT_SEED)
        xs = GRFDenoiser(32).sample_prior(n, generator=g).numpy().astype(np.float32)
    else:
        raise SystemExit(f"no cases for {model_id}; use phantom-64 or grf-32")
    jobs = []
    for j, x in enumerate(xs):
        density = 0.2 + 0.3 * j / max(1, n - 1)
        mask = np.random.default_rng(OBS_SEED + j).random(x.shape[-2:]) < density
        jobs.append({"x": x, "mask": mask, "y": (x * mask).astype(np.float32), "seed": 100 + j})
    return jobs


def run_concurrent(url: str, model_id: str, jobs: list[dict], method: dict) -> dict:
    """Submit ``jobs`` (``make_jobs``) at once from one thread and ``Client`` each (a barrier),
    wait for each and fetch its mean: ``{"wall_s": first submit to last result, "results",
    "statuses"}``."""
    from service.client import Client

    n = len(jobs)
    clients = [Client(url, timeout=900) for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(j):
        c, job = clients[j], jobs[j]
        barrier.wait()
        t0 = time.perf_counter()
        jid = c.submit(model_id, {"kind": "inpainting", "mask": job["mask"]}, job["y"], method=method,
                       seed=job["seed"], return_=("mean",))
        st = c.wait(jid, timeout=900)
        if st["status"] != "succeeded":
            raise RuntimeError(f"job {j} {st['status']}: {st.get('error')}")
        r = c.result(jid)
        return t0, time.perf_counter(), r, st

    try:
        with ThreadPoolExecutor(n) as pool:
            outs = list(pool.map(one, range(n)))
    finally:
        for c in clients:
            c.close()
    wall = max(o[1] for o in outs) - min(o[0] for o in outs)
    return {"wall_s": wall, "results": [o[2] for o in outs], "statuses": [o[3] for o in outs]}
