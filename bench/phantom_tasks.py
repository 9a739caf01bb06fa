"""Validation of the phantom-64 prior on four imaging tasks against classical baselines.

    .venv/bin/python bench/phantom_tasks.py                      # full: 10 cases, all tasks and methods
    .venv/bin/python bench/phantom_tasks.py --cases 2 --dps-steps 50 --methods fast:steps=30,classical
    .venv/bin/python bench/phantom_tasks.py --tune               # small grid on 3 tuning cases
    .venv/bin/python bench/phantom_tasks.py --model phantom-flow-64 --tuned bench/results/phantom-64-tune.json
                                                                 # another phantom prior, same tasks

Cases: held-out phantoms (``bench.common.HELD_OUT_SEED``, never the training seed 0), noise
``sigma = 0.02`` (physical units, images in [0, 1]). Tasks:

* ``box_inpainting``: a centred 24 x 24 hole;
* ``random_inpainting``: 70 % of the pixels missing (one seeded mask for all cases);
* ``deblur``: Gaussian blur 9 x 9, sigma 1.5, circular boundary;
* ``sr4``: 4x super-resolution (4 x 4 block means).

Methods (``--methods``, comma-separated ``name[:param=value...]``): ``dps`` (``--dps-steps``,
default 1000), ``ald`` (its defaults), ``fast`` (``fast:steps=30``, ``fast:steps=50``: at most
50 network evaluations), ``classical`` (biharmonic inpainting, oracle-lambda Wiener
deconvolution, bicubic upsampling; see ``bench/classical.py``). Each method runs all cases
of a task as one batch, one posterior sample per case, one random stream per case.

Reported: PSNR (data range 1) of the sample clipped to [0, 1], mean over cases and per case;
network evaluations per case (counted, not computed); wall-clock seconds for the batch.
``:samples=K`` scores the mean of K posterior samples per case instead (what a request with
``num_samples: K`` returns as ``mean``); its nfe is per sample, the compute K times that. It
also reports ``coverage_2sd``: per case, the fraction of ground-truth pixels within the mean
+- 2 std of the K samples (the uncertainty map's calibration; about 0.95 if calibrated).
Results go to ``--out`` (merged into an existing file entry by entry, written after each
method so that a long run keeps what it finished).

Tuning (``--tune``): on 3 cases from ``TUNE_SEED`` (not the reported ones), a small grid of
``fast``'s (lam, cg_iters) and, with ``--tune-methods fast,dps``, of ``dps``'s zeta per task; writes ``--tune-out``.
Pass that file to a full run with ``--tuned`` to use the best parameters per task.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import classical  # noqa: E402
from bench.common import (repo_path, CHECKPOINTS, HELD_OUT_SEED, OBS_SEED, TUNE_SEED, add_noise, atomic_write_json,  # noqa: E402
                          check_held_out, environment, finite_mean, fmt, held_out_phantoms, merge_result,
                          model_info, parse_method, previous_tuning, progress_printer, run_samples,
                          task_bench_main, task_bench_parser, tune_method, update_card)
from operators.blur import gaussian_kernel  # noqa: E402
from operators.spec import build_operator  # noqa: E402

MODEL = "phantom-64"
SHAPE = (1, 64, 64)
NOISE = 0.02
TASKS = ("box_inpainting", "random_inpainting", "deblur", "sr4")
DEFAULT_METHODS = "dps,ald,fast:steps=30,fast:steps=50,classical"
TUNE_GRID = {"fast": {"steps": [50], "lam": [1.0, 3.0], "cg_iters": [1, 4, 8]},
             "dps": {"zeta": [0.3, 1.0, 3.0]}}


# ----------------------------------------------------------------------------- tasks
def box_mask(n: int = 64, hole: int = 24) -> np.ndarray:
    m = np.ones((n, n))
    lo = (n - hole) // 2
    m[lo:lo + hole, lo:lo + hole] = 0
    return m


def random_mask(n: int = 64, missing: float = 0.7, seed: int = OBS_SEED) -> np.ndarray:
    """One seeded mask, 1 = observed: exactly round((1 - missing) n^2) observed pixels."""
    rng = np.random.default_rng(seed)
    m = np.zeros(n * n)
    m[rng.permutation(n * n)[: round((1 - missing) * n * n)]] = 1
    return m.reshape(n, n)


def task_spec(task: str) -> dict:
    if task == "box_inpainting":
        return {"kind": "inpainting", "mask": box_mask()}
    if task == "random_inpainting":
        return {"kind": "inpainting", "mask": random_mask()}
    if task == "deblur":
        return {"kind": "blur", "gaussian": {"sigma": 1.5, "size": 9}, "boundary": "circular"}
    if task == "sr4":
        return {"kind": "super_resolution", "factor": 4}
    raise KeyError(f"unknown task {task!r}; known: {TASKS}")


def describe_spec(spec: dict) -> dict:
    out = {k: v for k, v in spec.items() if k != "mask"}
    if "mask" in spec:
        out["observed_fraction"] = float(np.mean(spec["mask"]))
    return out


def observe(task: str, x: np.ndarray, noise: float = NOISE, seed_base: int = OBS_SEED):
    """``(operator, y [B, *obs])``: ``y = A x + noise`` (each case its own noise stream),
    unobserved inpainting entries zeroed."""
    spec = task_spec(task)
    op = build_operator(spec, SHAPE)
    xt = torch.as_tensor(x, dtype=torch.float64)
    t = TASKS.index(task)
    y = torch.cat([add_noise(op.forward(xt[i:i + 1]), noise, seed_base + 1000 * t + i) for i in range(len(x))])
    if spec["kind"] == "inpainting":
        y = op.forward(y)
    return spec, op, y


def classical_baseline(task: str, spec: dict, y: torch.Tensor, x_true: np.ndarray) -> tuple[np.ndarray, dict]:
    ys = y.numpy()
    info: dict = {}
    if spec["kind"] == "inpainting":
        info["name"] = "biharmonic inpainting (skimage)"
        out = [classical.biharmonic_inpaint(ys[i, 0], spec["mask"]) for i in range(len(ys))]
    elif spec["kind"] == "blur":
        g = spec["gaussian"]
        k = gaussian_kernel(g["sigma"], g["size"])
        res = [classical.wiener_deconvolve(ys[i, 0], k, x_true[i, 0]) for i in range(len(ys))]
        out = [r[0] for r in res]
        info.update(name="Wiener/Tikhonov, oracle lam per image (best PSNR vs truth on 1e-5..1)",
                    lam=[r[1] for r in res])
    else:
        info["name"] = "bicubic upsampling of the block means"
        out = [classical.bicubic_upsample(ys[i, 0], spec["factor"]) for i in range(len(ys))]
    return np.stack(out)[:, None], info


def psnrs(x: np.ndarray, x_true: np.ndarray) -> list[float]:
    return [classical.psnr(np.clip(x[i], 0, 1), x_true[i]) for i in range(len(x))]


# ----------------------------------------------------------------------------- running
def method_params(name: str, params: dict, task: str, tuned: dict, dps_steps: int) -> dict:
    """Tuned parameters, then ``--dps-steps`` for dps, then the ``--methods`` spec's own."""
    steps = {"steps": dps_steps} if name == "dps" else {}
    return {**(tuned.get(task, {}).get(name) or {}), **steps, **params}


def run_method(model, task: str, spec: dict, op, y, x_true, name: str, params: dict, seed0: int = 0,
               verbose: bool = True) -> dict:
    if name == "classical":
        t0 = time.perf_counter()
        x, info = classical_baseline(task, spec, y, x_true)
        return {"method": "classical", "baseline": info, "nfe": 0, "seconds": time.perf_counter() - t0,
                "psnr": psnrs(x, x_true), "diverged": False}
    params = dict(params)
    k = int(params.pop("samples", 1))  # k > 1: score the mean of k samples (what a request's mean is)
    cb = progress_printer(f"{task} {name}") if verbose else None
    r = run_samples(model, op, y, k, seed0=seed0, method=name, params=params, noise_sigma=NOISE, callback=cb)
    x = r["x"]
    e = {"method": name, "params": r["config"], "nfe": r["nfe"], "seconds": r["seconds"],
         "psnr": psnrs(x.mean(0), x_true), "diverged": r["diverged"]}
    if k > 1:
        # calibration: the fraction of ground-truth pixels inside mean +- 2 std of the k samples
        m, sd = x.mean(0), x.std(0, ddof=1)
        cover = (np.abs(np.asarray(x_true) - m) <= 2 * sd).reshape(len(m), -1).mean(1)
        e.update(samples=k, psnr_first_sample=psnrs(x[0], x_true), coverage_2sd=[float(c) for c in cover])
    return e


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    print(f"\n{'task':18s} {'method':34s} {'PSNR dB':>8s} {'min':>6s} {'max':>6s} {'nfe':>6s} {'seconds':>8s}")
    for task, label, e in rows:
        p = np.asarray(e["psnr"], dtype=np.float64)
        m = finite_mean(p)
        cover = f"  coverage(2sd) {np.mean(e['coverage_2sd']):.3f}" if "coverage_2sd" in e else ""
        print(f"{task:18s} {label:34s} {fmt(m):>8s} {fmt(float(np.min(p))):>6s} {fmt(float(np.max(p))):>6s} "
              f"{e['nfe']:>6d} {e['seconds']:>8.1f}" + ("  DIVERGED" if e.get("diverged") else "") + cover)


def main_run(args, model) -> None:
    tuned = json.loads(Path(args.tuned).read_text())["best"] if args.tuned else {}
    x_true = held_out_phantoms(args.cases)
    print(f"held-out check: {check_held_out(x_true, MODEL)}", file=sys.stderr)
    info = model_info(model, CHECKPOINTS / MODEL)  # MODEL: an id under checkpoints/ or a folder
    header = {"benchmark": "bench/phantom_tasks.py", "model": info, "cases": args.cases,
              "held_out_seed": HELD_OUT_SEED, "noise_sigma": NOISE, "tuned_from": repo_path(args.tuned),
              "environment": environment(torch.get_num_threads()),
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "psnr_note": ("one posterior sample per case (the mean of K for methods labelled samples=K), "
                            "clipped to [0, 1], data range 1")}
    print(f"{MODEL}: training steps {info['training_steps']}, weights {info['weights_sha256_16']}, "
          f"{args.cases} cases, noise {NOISE}", file=sys.stderr)
    rows = []
    for task in args.tasks.split(","):
        spec, op, y = observe(task, x_true)
        task_info = {"operator": describe_spec(spec)}
        for spec_str in args.methods.split(","):
            label, name, params = parse_method(spec_str)
            params = method_params(name, params, task, tuned, args.dps_steps)
            e = run_method(model, task, spec, op, y, x_true, name, params, verbose=not args.quiet)
            e["psnr_mean"] = finite_mean(e["psnr"])
            e["model_training_steps"] = info["training_steps"]
            rows.append((task, label, e))
            print(f"  {task:18s} {label:34s} PSNR {fmt(e['psnr_mean'])}  nfe {e['nfe']}  {e['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
            if args.out:
                merge_result(Path(args.out), header, task, task_info, label, e)
    print_table(rows)
    if args.update_card:
        data = json.loads(Path(args.out).read_text())
        update_card(MODEL, validation=card_validation(data))
        print(f"wrote the validation summary into checkpoints/{MODEL}/card.json", file=sys.stderr)


def card_validation(data: dict) -> dict:
    """A compact summary for the model card: PSNR mean and nfe per task and method."""
    return {"benchmark": data["benchmark"], "updated": data["updated"], "cases": data["cases"],
            "noise_sigma": data["noise_sigma"], "training_steps": data["model"]["training_steps"],
            "weights_sha256_16": data["model"]["weights_sha256_16"], "metric": "PSNR dB (one sample; the mean of K where samples=K)",
            "tasks": {t: {lab: {"psnr": round(e["psnr_mean"], 2) if e["psnr_mean"] is not None else None,
                                "nfe": e["nfe"], **({"samples": e["samples"]} if "samples" in e else {})}
                          for lab, e in d.get("methods", {}).items()}
                      for t, d in data["tasks"].items()}}


def tune(args, model) -> None:
    x_true = held_out_phantoms(args.tune_cases, seed=TUNE_SEED)
    grids = {**TUNE_GRID, **(json.loads(args.grid) if args.grid else {})}
    out = previous_tuning(args.tune_out)
    out.update({"benchmark": "bench/phantom_tasks.py --tune", "model": model_info(model, CHECKPOINTS / MODEL),
                "cases": args.tune_cases, "seed": TUNE_SEED, "noise_sigma": NOISE, "grid": grids})
    methods = args.tune_methods.split(",")
    for task in args.tasks.split(","):
        spec, op, y = observe(task, x_true, seed_base=OBS_SEED + 7)
        res = out["results"].setdefault(task, {})
        best = out["best"].setdefault(task, {})
        base = run_method(model, task, spec, op, y, x_true, "classical", {})
        res["classical"] = float(np.mean(base["psnr"]))
        print(f"\n{task}: classical {res['classical']:.2f} dB")
        for name in methods:
            grid = dict(grids[name])
            if name == "dps":
                grid = {"steps": [args.dps_steps], **grid}

            def evaluate(params, name=name):
                e = run_method(model, task, spec, op, y, x_true, name, params, verbose=False)
                m = finite_mean(e["psnr"])
                print(f"  {name:5s} {json.dumps(params):50s} PSNR {fmt(m)}  nfe {e['nfe']}  {e['seconds']:.1f} s",
                      flush=True)
                return m, {"psnr": m, "nfe": e["nfe"], "seconds": e["seconds"]}

            tune_method(res, best, name, grid, evaluate, maximize=True)
        if args.tune_out:
            atomic_write_json(Path(args.tune_out), out)
    print(json.dumps(out["best"], indent=1))


def build_parser():
    return task_bench_parser(__doc__, MODEL, cases=10, tasks=TASKS, methods=DEFAULT_METHODS, dps_steps=1000,
                             tune_methods="fast", grid_example='{"dps": {"zeta": [0.5, 1]}}')


def main(argv=None) -> None:
    global MODEL  # --model: another phantom prior (e.g. phantom-flow-64) on the same tasks
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=MODEL)
    MODEL = pre.parse_known_args(argv)[0].model
    parser = build_parser()
    parser.add_argument("--model", default=MODEL,
                        help="id (under checkpoints/) or folder of a 1 x 64 x 64 phantom prior [phantom-64]; "
                             "--out defaults to bench/results/<id>.json")
    task_bench_main(parser, MODEL, main_run, tune, argv)


if __name__ == "__main__":
    main()
