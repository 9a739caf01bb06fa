"""Throughput of the job queue's batching: 8 compatible jobs submitted at once vs one at a time.

    .venv/bin/python bench/batching_throughput.py                   # phantom-64 and grf-32, fast 30 steps
    .venv/bin/python bench/batching_throughput.py --models phantom-64 --reps 1 --no-unbatched-server

Eight jobs on one model with the same method and steps (hence one batch key: ``service/jobs.py``)
but different seeds, masks (inpainting, 20 % to 50 % observed) and observations (held-out phantoms
for phantom-64, prior draws for grf-32). Against a real uvicorn server (``reconserve serve``,
started here on a free localhost port with ``RECONSERVE_TORCH_THREADS`` equal to ``--threads``;
the checkpoints, which a running training may re-export, are snapshotted first):

* ``concurrent``: 8 threads, each with its own ``Client``, submit together (a barrier) and wait
  (``submit`` + ``wait`` + ``result``); the worker gathers compatible queued jobs into one
  batch (``max_batch`` 16, ``batch_window_ms`` 20: the defaults);
* ``sequential``: the same 8 jobs, each ``Client.reconstruct`` waited for before the next;
* ``concurrent, window=500ms`` (``--wide-window-ms``, 0 skips it): the same against a second
  server with ``RECONSERVE_BATCH_WINDOW_MS=500``. Eight POSTs "at once" do not all reach the
  queue within the default 20 ms on a loaded machine (each is parsed and validated first), so
  the default server may split them (``batched_with`` 1 + 7, 3 + 5); the wide window shows the
  throughput of one full batch (at the cost of that window's latency for every lone job);
* ``concurrent, max_batch=1`` (unless ``--no-unbatched-server``): the concurrent submission
  against a third server started with ``RECONSERVE_MAX_BATCH=1`` (batching off): separates
  the gain of batching from that of keeping the queue full.

Modes alternate within each repetition (order rotating); one warm-up round (2 steps) runs on each
server first. Reports wall time (first submit to last result), jobs/s, the ratio to sequential,
the ``nfe`` and ``batched_with`` each job reports, and whether each job's mean is the same
batched and alone (the queue promises each job the samples it would get alone; the column
``max|mean-alone|`` is the largest difference, 0 for bitwise equality: a float32 network run on a
batch of 8 may round differently from a batch of 1).
Writes ``bench/results/service-batching.json``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

from bench.common import (RESULTS, Server, atomic_write_json, environment, make_jobs,  # noqa: E402
                          run_concurrent, snapshot_checkpoints)
from service.client import Client  # noqa: E402


def run_sequential(url: str, model_id: str, jobs: list[dict], method: dict) -> dict:
    results = []
    with Client(url, timeout=900) as c:
        t0 = time.perf_counter()
        for job in jobs:
            results.append(c.reconstruct(model_id, {"kind": "inpainting", "mask": job["mask"]}, job["y"],
                                         method=method, seed=job["seed"], return_=("mean",)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "results": results, "statuses": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="phantom-64,grf-32")
    ap.add_argument("--method", default="fast")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each mode (after a warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="RECONSERVE_TORCH_THREADS of the servers")
    ap.add_argument("--wide-window-ms", type=float, default=500.0,
                    help="batch_window_ms of a second batching server (0: skip that mode)")
    ap.add_argument("--no-unbatched-server", action="store_true",
                    help="skip the concurrent run against a RECONSERVE_MAX_BATCH=1 server")
    ap.add_argument("--out", default=str(RESULTS / "service-batching.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(f"torch threads: servers RECONSERVE_TORCH_THREADS={args.threads} (this client process: "
          f"{torch.get_num_threads()}, it only encodes and waits)")
    model_ids = [m.strip() for m in args.models.split(",") if m.strip()]
    method = {"name": args.method, "steps": args.steps}
    wide = f"concurrent, window={args.wide_window_ms:g}ms"
    modes = (["concurrent", "sequential"] + ([wide] if args.wide_window_ms > 0 else [])
             + ([] if args.no_unbatched_server else ["concurrent, max_batch=1"]))

    tmp = Path(tempfile.mkdtemp(prefix="reconserve-batching-"))
    table, report = [], []
    try:
        digests = snapshot_checkpoints(model_ids, tmp / "models")
        models_dir = tmp / "models" if digests else None
        servers = {"batched": Server(args.threads, models_dir, log_path=tmp / "batched.log")}
        if args.wide_window_ms > 0:
            servers["wide"] = Server(args.threads, models_dir, log_path=tmp / "wide.log",
                                     env={"RECONSERVE_BATCH_WINDOW_MS": f"{args.wide_window_ms:g}"})
        if not args.no_unbatched_server:
            servers["unbatched"] = Server(args.threads, models_dir, env={"RECONSERVE_MAX_BATCH": "1"},
                                          log_path=tmp / "unbatched.log")
        for s in servers.values():
            s.__enter__()
        try:
            for s_name, s in servers.items():
                print(f"server {s_name}: {s.url} ready in {s.startup_s:.1f} s")
            runners = {"concurrent": lambda m, j: run_concurrent(servers["batched"].url, m, j, method),
                       "sequential": lambda m, j: run_sequential(servers["batched"].url, m, j, method),
                       wide: lambda m, j: run_concurrent(servers["wide"].url, m, j, method),
                       "concurrent, max_batch=1":
                           lambda m, j: run_concurrent(servers["unbatched"].url, m, j, method)}
            for model_id in model_ids:
                jobs = make_jobs(model_id, args.jobs)
                warm = {"name": args.method, "steps": 2}
                for s in servers.values():  # warm-up: a batch of n and a single job
                    run_concurrent(s.url, model_id, jobs, warm)
                    run_sequential(s.url, model_id, jobs[:1], warm)
                runs = {m: [] for m in modes}
                for r in range(args.reps):
                    order = modes[r % len(modes):] + modes[:r % len(modes)]
                    for m in order:
                        out = runners[m](model_id, jobs)
                        runs[m].append(out)
                        bw = sorted({int(x.get("batched_with") or 0) for x in out["results"]})
                        print(f"  {model_id} rep {r}: {m:27s} {out['wall_s']:7.2f} s  batched_with {bw}")
                # each job batched vs alone (last repetition of each mode)
                ref = [np.asarray(x["mean"]) for x in runs["sequential"][-1]["results"]]
                per_mode = {}
                for m in modes:
                    walls = [o["wall_s"] for o in runs[m]]
                    res = runs[m][-1]["results"]
                    diffs = [float(np.abs(np.asarray(x["mean"]) - ref[j]).max()) for j, x in enumerate(res)]
                    errs = [float(np.sqrt(np.mean((np.asarray(x["mean"]) - jobs[j]["x"]) ** 2)))
                            for j, x in enumerate(res)]
                    per_mode[m] = {
                        "wall_s": walls, "median_wall_s": statistics.median(walls),
                        "nfe_per_job": [int(x["nfe"]) for x in res],
                        "batched_with": [int(x.get("batched_with") or 0) for x in res],
                        "elapsed_s_per_job": [float(x["elapsed_s"]) for x in res],
                        "max_abs_diff_vs_sequential": diffs,
                        "identical_to_sequential": all(d == 0.0 for d in diffs),
                        "rmse_vs_truth": errs,
                    }
                seq = per_mode["sequential"]["median_wall_s"]
                for m in modes:
                    p = per_mode[m]
                    p["jobs_per_s"] = args.jobs / p["median_wall_s"]
                    p["speedup_vs_sequential"] = seq / p["median_wall_s"]
                    table.append((model_id, m, p))
                report.append({"model": model_id, "weights_sha256_16": digests.get(model_id, "built-in"),
                               "modes": per_mode})
        finally:
            for s in servers.values():
                s.__exit__(None, None, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"Batching throughput: {args.jobs} compatible jobs ({args.method} {args.steps} steps, inpainting, "
          f"different seeds/masks/observations), server torch threads {args.threads}, "
          f"median of {args.reps} reps")
    hdr = (f"{'model':11s} {'mode':27s} {'wall s':>7s} {'jobs/s':>7s} {'speed-up':>8s} "
           f"{'nfe/job':>8s} {'batched_with':>13s} {'max|mean-alone|':>15s}")
    print(hdr)
    print("-" * len(hdr))
    for model_id, m, p in table:
        nfe = sorted(set(p["nfe_per_job"]))
        bw = sorted(set(p["batched_with"]))
        print(f"{model_id:11s} {m:27s} {p['median_wall_s']:7.2f} {p['jobs_per_s']:7.3f} "
              f"{p['speedup_vs_sequential']:7.2f}x {','.join(map(str, nfe)):>8s} "
              f"{','.join(map(str, bw)):>13s} {max(p['max_abs_diff_vs_sequential']):15.1e}")
    for rep in report:
        for name, m in rep["modes"].items():
            if name == "sequential" or name.endswith("max_batch=1"):
                continue
            print(f"{rep['model']} {name} (last rep): jobs report nfe {m['nfe_per_job']}, batched_with "
                  f"{m['batched_with']}; max |mean batched - mean alone| = "
                  f"{max(m['max_abs_diff_vs_sequential']):.2e}")

    out = {"benchmark": "service-batching", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "jobs": args.jobs, "method": method, "operator": "inpainting, 20 % .. 50 % observed, one mask per job",
           "reps": args.reps, "warmup": "one 2-step round (batch and single) on each server",
           "server_settings": {"batched": "defaults (max_batch 16, batch_window_ms 20)",
                               "wide": (f"RECONSERVE_BATCH_WINDOW_MS={args.wide_window_ms:g}"
                                        if args.wide_window_ms > 0 else None),
                               "unbatched": None if args.no_unbatched_server else "RECONSERVE_MAX_BATCH=1"},
           "environment": environment(args.threads, loadavg=True),
           "note": "the machine is shared with two training processes: compare ratios, not absolute times; "
                   "nfe is the number of (batched) network calls the job's batch made",
           "results": report}
    atomic_write_json(Path(args.out), out)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
