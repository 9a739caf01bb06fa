"""Scale-out throughput: 16 concurrent jobs on Ray Serve with one worker replica against two.

    .venv/bin/python bench/ray_throughput.py                      # phantom-64, fast 30 steps, 16 jobs
    .venv/bin/python bench/ray_throughput.py --models grf-32 --reps 1

For each replica count, ``reconserve serve --ray`` starts a local Ray cluster (``--ray-cpus``)
with that many worker replicas (``RECONSERVE_RAY_MIN_WORKERS = RECONSERVE_RAY_MAX_WORKERS``, one
CPU and ``--threads`` torch threads each), its job store on PostgreSQL (a throwaway cluster of
Debian's package, as the tests start it; SQLite where none is installed). The same 16
inpainting jobs as ``bench/batching_throughput.py`` (different truths, masks and seeds) are
submitted at once by 16 clients and waited for; each replica holds up to 16 jobs and batches the
compatible ones. Reports the wall time (first submit to last result), jobs/s, the ratio of two
replicas to one, how many jobs each replica ran, and whether every job's mean is the same in
both runs (batching changes float32 rounding only). Writes ``bench/results/ray-throughput.json``.
On this project's 2-core machine both replicas share two cores with Ray's own processes, so the
ratio is bounded by 2 and by what else runs; on a GPU cluster each replica has its own GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (RESULTS, Server, atomic_write_json, environment, make_jobs, run_concurrent,  # noqa: E402
                          snapshot_checkpoints)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="phantom-64")
    ap.add_argument("--method", default="fast")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--replicas", default="1,2", help="worker replica counts to compare")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per replica count (after a warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--out", default=str(RESULTS / "ray-throughput.json"))
    args = ap.parse_args(argv)

    model_ids = [m.strip() for m in args.models.split(",") if m.strip()]
    counts = [int(n) for n in args.replicas.split(",")]
    method = {"name": args.method, "steps": args.steps}
    tmp = Path(tempfile.mkdtemp(prefix="reconserve-ray-bench-"))
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment(args.threads, loadavg=True),
              "method": method, "jobs": args.jobs, "ray_cpus": args.ray_cpus, "runs": []}
    with ExitStack() as stack:
        digests = snapshot_checkpoints(model_ids, tmp / "models")
        models_dir = tmp / "models" if digests else None
        from tests.helpers.postgres import fresh_database, postgres_url

        pg = stack.enter_context(postgres_url())  # None: no server here, the replicas share SQLite
        report["store"] = "postgresql" if pg else "sqlite"
        means: dict = {}
        for n in counts:
            env = {"RECONSERVE_RAY_MIN_WORKERS": str(n), "RECONSERVE_RAY_MAX_WORKERS": str(n),
                   "RECONSERVE_RAY_JOBS_PER_WORKER": str(args.jobs), "RECONSERVE_QUEUE_SIZE": str(4 * args.jobs),
                   "RECONSERVE_DATA_DIR": str(tmp / f"data-{n}")}
            if pg:
                env["RECONSERVE_DATABASE_URL"] = fresh_database(pg, f"reconserve_bench_{n}")
            server = Server(args.threads, models_dir, env=env, log_path=tmp / f"ray-{n}.log")
            server.cmd += ["--ray", "--ray-cpus", str(args.ray_cpus)]
            with server:
                print(f"{n} replica(s): ready in {server.startup_s:.1f} s")
                for model_id in model_ids:
                    jobs = make_jobs(model_id, args.jobs)
                    run_concurrent(server.url, model_id, jobs, {"name": args.method, "steps": 2})  # warm-up
                    walls, spread = [], []
                    for r in range(args.reps):
                        out = run_concurrent(server.url, model_id, jobs, method)
                        walls.append(out["wall_s"])
                        spread = sorted(Counter(st["worker"] for st in out["statuses"]).values(), reverse=True)
                        print(f"  {model_id} rep {r}: {out['wall_s']:7.2f} s   jobs per replica {spread}")
                        time.sleep(1.0)
                    means[(model_id, n)] = [np.asarray(x["mean"]) for x in out["results"]]
                    report["runs"].append({"model": model_id, "replicas": n, "wall_s": walls,
                                           "median_wall_s": statistics.median(walls),
                                           "jobs_per_s": args.jobs / statistics.median(walls),
                                           "jobs_per_replica": spread,
                                           "batched_with": [int(x.get("batched_with") or 0) for x in out["results"]]})
    print(f"\n| model | worker replicas | wall (s, median of {args.reps}) | jobs/s | vs 1 replica | jobs per replica |")
    print("|---|---|---|---|---|---|")
    for run in report["runs"]:
        base = next(r for r in report["runs"] if r["model"] == run["model"] and r["replicas"] == counts[0])
        run["speedup_vs_first"] = base["median_wall_s"] / run["median_wall_s"]
        print(f"| {run['model']} | {run['replicas']} | {run['median_wall_s']:.2f} | {run['jobs_per_s']:.2f} | "
              f"{run['speedup_vs_first']:.2f}x | {run['jobs_per_replica']} |")
    for model_id in model_ids:
        a, b = means[(model_id, counts[0])], means[(model_id, counts[-1])]
        diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
        report.setdefault("max_abs_diff_of_means", {})[model_id] = diff
        print(f"{model_id}: largest difference of a job's mean between {counts[0]} and {counts[-1]} replicas: {diff:.2e}")
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
