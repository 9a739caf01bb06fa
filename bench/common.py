"""Shared pieces of the validation benchmarks: held-out data, batched solving, results files, cards.

Held-out data. Training used ``seed = 0`` (``card["training"]["data_seed"]``); the benchmarks
draw their cases with ``HELD_OUT_SEED`` and tune parameters on ``TUNE_SEED`` cases, so neither
the reported numbers nor the tuning see a training example. ``models.data`` draws every
example from ``numpy.random.default_rng(seed)``: different seeds are independent streams
(NumPy's ``SeedSequence``), and ``check_held_out`` confirms that no held-out example equals
a training example when the training set is at hand (``runs/<id>/data.npy``).

Batched solving. ``solve`` takes one observation; ``run_batched`` runs the same driver
(``guidance.driver.sample_batch``) with one item per case, each with its own seeded random
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
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guidance.core import DivergedError  # noqa: E402
from guidance.driver import BatchItem, sample_batch  # noqa: E402
from guidance.registry import METHODS  # noqa: E402
from guidance.solve import Plan  # noqa: E402
from models.checkpoint import CARD, WEIGHTS, load_checkpoint  # noqa: E402
from models.schedules import get_sigmas  # noqa: E402

CHECKPOINTS = ROOT / "checkpoints"
RESULTS = ROOT / "bench" / "results"
HELD_OUT_SEED = 1000003  # reported cases
TUNE_SEED = 2000003  # parameter tuning cases (disjoint from the reported ones)
OBS_SEED = 424242  # observation noise, random masks and observed nodes


# ----------------------------------------------------------------------------- models and data
def load_model(model_id: str, device: str = "cpu"):
    """``checkpoints/<model_id>`` as a ``LoadedModel`` (the current export of a running training)."""
    return load_checkpoint(CHECKPOINTS / model_id, device)


def weights_digest(model_id: str) -> str:
    """First 16 hex digits of the weights' sha256: ties a result to the exact export it used."""
    h = hashlib.sha256((CHECKPOINTS / model_id / WEIGHTS).read_bytes())
    return h.hexdigest()[:16]


def model_info(model) -> dict:
    tr = model.card.get("training") or {}
    return {"id": model.id, "training_steps": tr.get("steps"), "training_updated": tr.get("updated"),
            "final_loss": tr.get("final_loss"), "weights_sha256_16": weights_digest(model.id)}


def held_out_phantoms(num: int, seed: int = HELD_OUT_SEED, n: int = 64) -> np.ndarray:
    """``[num, 1, n, n]`` float32 phantoms in [0, 1] from a seed other than the training one."""
    from models.data import phantoms

    return phantoms(num, n, seed)


def held_out_darcy(num: int, seed: int = HELD_OUT_SEED, n: int = 64) -> np.ndarray:
    """``[num, 2, n, n]`` float64 Darcy pairs (a, u), u the exact discrete solution."""
    from models.data import darcy_pairs

    return darcy_pairs(num, n, seed, dtype=np.float64)


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


def run_batched(model, operator, y, *, method: str, params: dict | None = None, noise_sigma: float = 0.0,
                pde=None, seeds=None, callback=None) -> dict:
    """Solve a batch of observations ``y [B, *obs_shape]`` (physical units) sharing one operator.

    Returns ``{"x": [B, C, H, W] float64 numpy (physical), "nfe", "seconds", "config", "diverged"}``;
    a sampler that diverges gives NaNs and ``diverged = True`` instead of raising.
    """
    cfg = METHODS[method].make_config(params or {})
    den = model.denoiser
    plan = Plan(method, cfg, get_sigmas(cfg.schedule, cfg.steps, den.sigma_min, den.sigma_max))
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    seeds = list(range(len(y))) if seeds is None else [int(s) for s in seeds]
    t0 = time.perf_counter()
    diverged = False
    try:
        run = sample_batch(model, plan, [BatchItem(operator, yi, 1, s) for yi, s in zip(y, seeds)],
                           noise_sigma=noise_sigma, pde=pde, callback=callback)
        x, nfe = torch.cat(run.samples).numpy(), run.nfe
    except DivergedError as e:
        diverged, nfe = True, e.nfe
        x = np.full((len(y),) + tuple(model.card["shape"]), np.nan)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
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


def add_noise(y: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- results files
def environment(threads: int) -> dict:
    return {"torch": torch.__version__, "threads": threads, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


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
