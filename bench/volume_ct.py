"""Sparse-view CT of a 3-D volume with a 2-D prior: slices independent vs coupled by TV along z.

A 3-D phantom (an ellipsoidal head with a bright rim holding random inner ellipsoids, the 3-D
analogue of ``phantom-64``'s training phantoms; its axial slices are 64 x 64) is observed slice
by slice by parallel-beam CT with 8 and 16 angles and Gaussian noise. Three reconstructions:
filtered back-projection (the operator's pseudo-inverse), the prior's posterior mean with the
slices independent, and the same with the slices coupled by ``{"kind": "tv_z"}``
(``guidance.coupling``, after DiffusionMBIR, Chung et al. CVPR 2023). Scores: PSNR of the
volume, and of its sagittal and coronal re-slices through the central half of the head (the
views where slices that disagree show as streaks). Then the peak memory of a coupled run as
the volume grows (64 vs 128 slices), each in its own process, with the network called in
chunks of ``--chunk`` rows and, for comparison, in one call for the whole volume.

    nice -n 10 .venv/bin/python bench/volume_ct.py            # ~15 min on 1 busy core
    .venv/bin/python bench/volume_ct.py --smoke               # seconds; writes nothing

Results: ``bench/results/volume-ct.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.classical import psnr  # noqa: E402
from bench.common import HELD_OUT_SEED, OBS_SEED, RESULTS, add_noise, atomic_write_json, environment, load_model  # noqa: E402
from guidance.coupling import Coupling  # noqa: E402
from guidance.driver import BatchItem, sample_batch  # noqa: E402
from guidance.solve import plan_method  # noqa: E402
from guidance.volume import slice_seed  # noqa: E402
from operators.tomography import CT  # noqa: E402

MODEL = "phantom-64"
OUT = RESULTS / "volume-ct.json"
#: CT noise (projection units: a 64-pixel ray through the head integrates to ~10-20).
NOISE = 0.1
METHOD = {"steps": 10, "cg_iters": 0}  # fast's closed-form data step: no backprop (CPU budget)


# ----------------------------------------------------------------------------- the phantom
def phantom_volume(d: int, n: int = 64, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """``[d, 1, n, n]`` in [0, 1]: an ellipsoid head (rim 0.8-1.0, interior 0.1-0.35) holding
    6-10 inner ellipsoids (rotated about z) of signed intensity; slices cover z in [-0.8, 0.8]."""
    rng = np.random.default_rng(seed)
    t = (np.arange(n) + 0.5) / n * 2 - 1
    z = np.linspace(-0.8, 0.8, d)
    Z, Y, X = np.meshgrid(z, t, t, indexing="ij")

    def ellipsoid(c, axes, th):
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        xr, yr = np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy
        return (xr / axes[0]) ** 2 + (yr / axes[1]) ** 2 + (dz / axes[2]) ** 2 <= 1.0

    axes = np.array([rng.uniform(0.66, 0.76), rng.uniform(0.80, 0.88), 0.98])
    th, rim = rng.uniform(-0.2, 0.2), 0.07
    inner = ellipsoid((0, 0, 0), axes - rim, th)
    vol = np.where(ellipsoid((0, 0, 0), axes, th), rng.uniform(0.8, 1.0), 0.0)
    vol = np.where(inner, rng.uniform(0.15, 0.3), vol)
    for _ in range(rng.integers(6, 11)):
        c = rng.uniform(-0.45, 0.45, 3) * np.array([axes[0], axes[1], 0.9])
        ax = rng.uniform(0.08, 0.3, 3) * np.array([1, 1, 1.6])
        val = rng.uniform(-0.2, -0.05) if rng.random() < 0.25 else rng.uniform(0.1, 0.5)
        vol = vol + inner * val * ellipsoid(c, ax, rng.uniform(0, np.pi))
    return np.clip(vol, 0, 1).astype(np.float32)[:, None]


# ----------------------------------------------------------------------------- scores
def reslices(vol: np.ndarray, axis: int) -> np.ndarray:
    """Re-slices of ``[D, 1, H, W]`` through the central half: sagittal (``axis`` 3, fixed x:
    ``[W/2, D, H]``) or coronal (``axis`` 2, fixed y)."""
    v = vol[:, 0]
    n = v.shape[axis - 1]
    sl = np.moveaxis(v, axis - 1, 0)[n // 4: 3 * n // 4]
    return sl


def scores(x: np.ndarray, truth: np.ndarray) -> dict:
    x = np.clip(x, 0, 1)
    return {"volume": psnr(x, truth), "sagittal": psnr(reslices(x, 3), reslices(truth, 3)),
            "coronal": psnr(reslices(x, 2), reslices(truth, 2))}


# ----------------------------------------------------------------------------- runs
def observe(truth: np.ndarray, angles: int):
    op = CT((1, truth.shape[2], truth.shape[3]), angles=[180.0 * i / angles for i in range(angles)])
    y = add_noise(op.forward(torch.as_tensor(truth, dtype=torch.float64)), NOISE, OBS_SEED + angles)
    return op, y


def reconstruct(model, op, y, coupling, params: dict, chunk: int | None, seed: int = 0):
    """The posterior mean (one sample) of every slice in one sampler run: ``(volume, seconds)``."""
    plan = plan_method(model.card, model.denoiser, "fast", params)
    items = [BatchItem(op, y[d], 1, slice_seed(seed, d), volume="v", coupling=coupling) for d in range(len(y))]
    with torch.no_grad():
        run = sample_batch(model, plan, items, noise_sigma=NOISE, chunk=chunk, dtype="float32")  # (as on a GPU)
    return torch.stack([s[0] for s in run.samples]).float().numpy(), run.seconds


def quality(model, d: int, angles: int, weight: float, params: dict, chunk: int) -> dict:
    truth = phantom_volume(d)
    op, y = observe(truth, angles)
    with torch.no_grad():
        fbp = op.pseudo_inverse(y).float().numpy()
    row = {"fbp": scores(fbp, truth)}
    for label, coupling in (("independent", None), ("tv_z", Coupling(weight=weight))):
        x, sec = reconstruct(model, op, y, coupling, params, chunk)
        row[label] = dict(scores(x, truth), seconds=round(sec, 1))
        print(f"  {angles} angles {label:12s} " + " ".join(f"{k} {v:.2f}" for k, v in row[label].items()), flush=True)
    row["gain_over_independent"] = {k: row["tv_z"][k] - row["independent"][k] for k in ("volume", "sagittal", "coronal")}
    row["gain_over_fbp"] = {k: row["tv_z"][k] - row["fbp"][k] for k in ("volume", "sagittal", "coronal")}
    return row


def rss_mib() -> float:
    """This process's resident memory now (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(d: int, chunk: int, steps: int, weight: float) -> dict:
    """One coupled run of ``d`` slices in this process: the resident memory just before sampling
    (model loaded, data made) and its peak while sampling (read every 5 ms by a thread; the
    process's lifetime peak, ``ru_maxrss``, is set while loading and says nothing here)."""
    model = load_model(MODEL)
    op, y = observe(phantom_volume(d), 8)
    before, peak, running = rss_mib(), [0.0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        _, sec = reconstruct(model, op, y, Coupling(weight=weight), dict(METHOD, steps=steps), chunk)
    finally:
        running[0] = False
        thread.join()
    return {"slices": d, "chunk": chunk, "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak[0], 1),
            "growth_mib": round(peak[0] - before, 1), "seconds": round(sec, 1)}


def memory(sizes, chunk: int, steps: int, weight: float) -> list[dict]:
    out = []
    for d in sizes:
        for c in (chunk, d):  # chunked, then the whole volume in one network call
            cmd = [sys.executable, __file__, "--memory-child", str(d), "--chunk", str(c), "--mem-steps", str(steps),
                   "--weight", str(weight)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  memory: {out[-1]}", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--angles", default="8,16")
    p.add_argument("--weight", type=float, default=0.05, help="tv_z weight (physical units)")
    p.add_argument("--steps", type=int, default=METHOD["steps"])
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--mem-sizes", default="64,128")
    p.add_argument("--mem-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="4 slices, 2 steps, no memory runs, nothing written")
    p.add_argument("--memory-only", action="store_true", help="rerun the memory runs into the existing results")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.chunk, args.mem_steps, args.weight)))
        return
    if args.memory_only:  # the memory runs again, into the existing results
        result = json.loads(OUT.read_text())
        result["memory"] = memory([int(v) for v in args.mem_sizes.split(",")], args.chunk, args.mem_steps,
                                  args.weight)
        atomic_write_json(OUT, result)
        return
    if args.smoke:
        args.slices, args.steps = 4, 2
    params = dict(METHOD, steps=args.steps)
    model = load_model(MODEL)
    t0 = time.perf_counter()
    rows = {}
    for a in (int(v) for v in args.angles.split(",")):
        rows[f"{a}_angles"] = quality(model, args.slices, a, args.weight, params, args.chunk)
    result = {"benchmark": "bench/volume_ct.py", "model": MODEL, "slices": args.slices, "noise_sigma": NOISE,
              "method": {"name": "fast", **params}, "coupling": {"kind": "tv_z", "weight": args.weight},
              "chunk": args.chunk, "psnr_note": "dB against the phantom, values clipped to [0, 1]; sagittal and "
              "coronal: the re-slices through the central half of the volume", "angles": rows}
    if not args.smoke:
        sizes = [int(v) for v in args.mem_sizes.split(",")]
        result["memory"] = memory(sizes, args.chunk, args.mem_steps, args.weight)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["environment"] = environment(args.threads, loadavg=True)
        atomic_write_json(OUT, result)
        print(f"wrote {OUT}")
    print(json.dumps({k: {m: {s: round(v, 2) for s, v in r[m].items()} for m in ("fbp", "independent", "tv_z")}
                      for k, r in rows.items()}))


if __name__ == "__main__":
    main()
