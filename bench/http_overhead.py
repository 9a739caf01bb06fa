"""End-to-end HTTP time of one job against the same solve in-process (the service's overhead).

    .venv/bin/python bench/http_overhead.py                     # phantom-64, fast, 50 steps, 9 kept reps
    .venv/bin/python bench/http_overhead.py --method dps --reps 3 --threads 1

The script snapshots the model's checkpoint (``checkpoints/<id>`` may be re-exported by a
running training) into a temporary folder, loads it in this process, and starts a
real uvicorn server (``reconserve serve --models <snapshot>``; the snapshot overrides the
built-in folder) on a free localhost port with ``RECONSERVE_TORCH_THREADS`` equal to this
process's ``torch.get_num_threads()``. So both sides run the same weights with the same number
of intra-op threads.

Variants, interleaved (the order rotates every repetition; the first repetition of each
is a warm-up and is discarded):

* ``in-process``: ``guidance.solve.solve(model, operator, y, method, params, seed)``;
* ``http-sync``: ``Client.reconstruct`` (``POST /v1/reconstruct``: encode, send, queue, solve,
  encode the result, decode it);
* ``http-submit-wait``: ``Client.submit`` + ``Client.wait`` (server-sent events) + ``Client.result``;
* ``http-sync+malloc`` (unless ``--no-malloc-server``): ``http-sync`` against a second server
  started with ``MALLOC_ENV`` (fixed glibc mmap/trim thresholds). The column ``page faults``
  (minor page faults of the process that ran the job) shows why: the service's worker thread
  hands freed tensor memory back to the kernel and faults it in again at every step.

Repetition ``r`` uses seed ``r`` on every variant; the means must agree exactly (same seed, same
weights, same thread count -> the same floating-point operations). A 1-step job measured the same
way gives the fixed cost per request. Writes ``bench/results/service-http-overhead.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
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

from bench.common import (HELD_OUT_SEED, OBS_SEED, RESULTS, Server, atomic_write_json, environment,  # noqa: E402
                          snapshot_checkpoints)
from guidance.solve import solve  # noqa: E402
from models.checkpoint import load_checkpoint, load_models  # noqa: E402
from operators.spec import build_operator  # noqa: E402
from service.client import Client  # noqa: E402

#: glibc malloc settings of the optional second server (variant ``http-sync+malloc``). Fixed
#: thresholds keep freed tensor memory in the heap instead of returning it to the kernel after
#: every step (which the service's worker thread otherwise does: tens of thousands of page
#: faults per job, see the ``page faults`` column).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}


def median(v):
    return statistics.median(v) if v else float("nan")


# ----------------------------------------------------------------------------- the case
def make_case(model_id: str, shape, density: float):
    """A held-out truth (phantoms for phantom-64; a prior draw for grf-32), a random mask, y = mask * x."""
    c, h, w = shape
    if model_id.startswith("phantom"):
        from models.data import phantoms
        x = phantoms(1, h, HELD_OUT_SEED)[0].astype(np.float32)
    else:
        x = np.random.default_rng(HELD_OUT_SEED).standard_normal((c, h, w)).astype(np.float32)
    mask = np.random.default_rng(OBS_SEED).random((h, w)) < density
    y = (x * mask).astype(np.float32)
    return x, mask, y


def minor_faults(pid: int | None = None) -> int:
    """Minor page faults so far of this process (``pid`` None) or of process ``pid`` (Linux)."""
    try:
        if pid is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[7])
    except (OSError, ValueError, IndexError):
        return -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="phantom-64")
    ap.add_argument("--method", default="fast")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=9, help="kept repetitions per variant (one more is a warm-up)")
    ap.add_argument("--small-reps", type=int, default=5, help="repetitions of the 1-step job (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    ap.add_argument("--density", type=float, default=0.3, help="fraction of observed pixels")
    ap.add_argument("--no-malloc-server", action="store_true",
                    help="skip the second server started with MALLOC_ENV (variant http-sync+malloc)")
    ap.add_argument("--out", default=str(RESULTS / "service-http-overhead.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch threads: in-process {threads}, server RECONSERVE_TORCH_THREADS={threads}")

    tmp = Path(tempfile.mkdtemp(prefix="reconserve-http-overhead-"))
    try:
        digests = snapshot_checkpoints([args.model], tmp / "models")
        models_dir = tmp / "models" if digests else None
        if args.model in digests:
            model = load_checkpoint(models_dir / args.model)
        else:
            model = load_models()[args.model]  # a built-in (grf-32)
        shape = tuple(model.card["shape"])
        x, mask, y = make_case(args.model, shape, args.density)
        spec = {"kind": "inpainting", "mask": mask}
        operator = build_operator(spec, shape)
        params = {"steps": args.steps}
        method_body = {"name": args.method, **params}
        print(f"model {args.model} (weights {digests.get(args.model, 'built-in')}), {args.method} "
              f"{args.steps} steps, inpainting {mask.mean():.0%} observed, 1 sample")

        with contextlib.ExitStack() as stack:
            server = stack.enter_context(Server(threads, models_dir, log_path=tmp / "server.log"))
            client = stack.enter_context(Client(server.url, timeout=600))
            print(f"server {server.url} ready in {server.startup_s:.1f} s")
            mserver = mclient = None
            if not args.no_malloc_server:
                mserver = stack.enter_context(Server(threads, models_dir, env=MALLOC_ENV,
                                                     log_path=tmp / "server-malloc.log"))
                mclient = stack.enter_context(Client(mserver.url, timeout=600))
                print(f"server {mserver.url} with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} "
                      f"ready in {mserver.startup_s:.1f} s")

            def in_process(seed, steps):
                f0, t0 = minor_faults(), time.perf_counter()
                sol = solve(model, operator, y, method=args.method, params={**params, "steps": steps},
                            seed=seed)
                return time.perf_counter() - t0, sol.mean, sol.nfe, sol.elapsed_s, minor_faults() - f0

            def http_sync(seed, steps, srv=server, cl=client):
                f0, t0 = minor_faults(srv.proc.pid), time.perf_counter()
                r = cl.reconstruct(args.model, spec, y, method={**method_body, "steps": steps},
                                   seed=seed, return_=("mean",))
                return (time.perf_counter() - t0, r["mean"], r["nfe"], r["elapsed_s"],
                        minor_faults(srv.proc.pid) - f0)

            def http_submit_wait(seed, steps):
                f0, t0 = minor_faults(server.proc.pid), time.perf_counter()
                jid = client.submit(args.model, spec, y, method={**method_body, "steps": steps},
                                    seed=seed, return_=("mean",))
                st = client.wait(jid, timeout=600)
                if st["status"] != "succeeded":
                    raise RuntimeError(f"job {jid} {st['status']}: {st.get('error')}")
                r = client.result(jid)
                return (time.perf_counter() - t0, r["mean"], r["nfe"], r["elapsed_s"],
                        minor_faults(server.proc.pid) - f0)

            variants = {"in-process": in_process, "http-sync": http_sync,
                        "http-submit-wait": http_submit_wait}
            if mserver is not None:
                variants["http-sync+malloc"] = lambda seed, steps: http_sync(seed, steps, mserver, mclient)
            names = list(variants)

            def run(steps, reps, label):
                times = {n: [] for n in names}
                solver_s = {n: [] for n in names}
                faults = {n: [] for n in names}
                nfe = {n: None for n in names}
                checks = []
                for r in range(reps + 1):  # r == 0: warm-up
                    order = names[r % len(names):] + names[:r % len(names)]
                    means = {}
                    for n in order:
                        dt, mean, k, el, fl = variants[n](r, steps)
                        means[n], nfe[n] = np.asarray(mean, dtype=np.float32), k
                        if r > 0:
                            times[n].append(dt)
                            solver_s[n].append(el)
                            faults[n].append(fl)
                    ref = means["in-process"]
                    diffs = {n: float(np.abs(means[n] - ref).max()) for n in names if n != "in-process"}
                    equal = all(np.array_equal(means[n], ref) for n in names)
                    checks.append({"seed": r, "max_abs_diff_vs_in_process": diffs, "bitwise_equal": equal})
                    print(f"  [{label}] rep {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
                        f"{n} {t[-1]:.3f}s" if r > 0 else n for n, t in times.items())
                        + f"; seed {r}: means bitwise equal: {equal} (max |diff| "
                        + ", ".join(f"{v:.2e}" for v in diffs.values()) + ")", flush=True)
                return times, solver_s, nfe, checks, faults

            print(f"{args.steps}-step job, {args.reps} kept repetitions (+1 warm-up), order rotating:")
            times, solver_s, nfe, checks, faults = run(args.steps, args.reps, f"{args.steps} steps")
            small = None
            if args.small_reps > 0:
                print(f"1-step job (fixed cost per request), {args.small_reps} kept repetitions:")
                small = run(1, args.small_reps, "1 step")
        log_tail = (tmp / "server.log").read_text()[-1500:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = median(times["in-process"])
    rows = []
    for n in names:
        m = median(times[n])
        row = {"variant": n, "median_s": m, "min_s": min(times[n]), "max_s": max(times[n]),
               "times_s": times[n], "median_solver_s": median(solver_s[n]), "nfe": nfe[n],
               "ratio_vs_in_process": m / base, "median_minor_page_faults": median(faults[n])}
        if small is not None:
            sm = median(small[0][n])
            row["one_step_median_s"] = sm
            row["one_step_overhead_ms"] = 1000 * (sm - median(small[0]["in-process"]))
        rows.append(row)
    all_equal = all(c["bitwise_equal"] for c in checks) and (
        small is None or all(c["bitwise_equal"] for c in small[3]))

    print()
    print(f"HTTP overhead: {args.model}, {args.method} {args.steps} steps, 1 sample, inpainting, "
          f"torch threads {threads} (both sides), {args.reps} reps (median; warm-up dropped)")
    hdr = (f"{'variant':18s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'solver s':>9s} {'nfe':>4s} "
           f"{'ratio':>6s} {'page faults':>11s}")
    if small is not None:
        hdr += f" {'1-step s':>9s} {'fixed ms':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        line = (f"{row['variant']:18s} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['max_s']:7.3f} "
                f"{row['median_solver_s']:9.3f} {row['nfe']:4d} {row['ratio_vs_in_process']:6.3f} "
                f"{row['median_minor_page_faults']:11.0f}")
        if small is not None:
            line += f" {row['one_step_median_s']:9.3f} {row['one_step_overhead_ms']:9.1f}"
        print(line)
    target = 1.05
    shipped = [r["ratio_vs_in_process"] for r in rows if r["variant"] in ("http-sync", "http-submit-wait")]
    worst = max(shipped)
    print(f"ratio HTTP / in-process (server as shipped): sync {shipped[0]:.3f}x, submit+wait {shipped[1]:.3f}x "
          f"(target <= {target}x: {'met' if worst <= target else 'NOT met'})")
    if "http-sync+malloc" in names:
        print(f"ratio with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}: sync "
              f"{rows[names.index('http-sync+malloc')]['ratio_vs_in_process']:.3f}x")
    print("page faults: minor page faults of the process that ran the job (this one, or the server's) per job")
    print(f"same seed -> same mean (HTTP vs in-process, every repetition, bitwise): {all_equal}")

    out = {"benchmark": "service-http-overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": args.model, "weights_sha256_16": digests.get(args.model), "method": args.method,
           "steps": args.steps, "num_samples": 1, "operator": f"inpainting, {args.density:.0%} observed",
           "reps_kept": args.reps, "warmup_dropped": 1, "order": "rotating every repetition",
           "environment": environment(threads, loadavg=True),
           "malloc_server_env": None if args.no_malloc_server else MALLOC_ENV,
           "note": "the machine is shared with two training processes: compare ratios, not absolute times",
           "rows": rows, "checks": checks, "one_step_checks": small[3] if small else None,
           "identical_results": all_equal, "target_ratio": target, "worst_ratio_as_shipped": worst,
           "server_log_tail": log_tail}
    atomic_write_json(Path(args.out), out)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
