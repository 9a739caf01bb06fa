"""A fixed-size prior on larger images: tiles (``models/tiling.py``) against the whole-image pass.

The phantom tasks (random and box inpainting, Gaussian deblurring, 4x super-resolution) and
sparse-view CT at each size, on Shepp-Logan (scikit-image) and on held-out ellipse phantoms
generated at that size, noise ``--noise``: PSNR of the classical baseline, of ``phantom-64``
run tile by tile and of the same network run on the whole image (it is fully convolutional);
seconds per image and per pixel; seams: on the tiled mean, the mean absolute Laplacian on the
borders of the last step's tiles over the same inside the tiles (1 = no seam).

    .venv/bin/python bench/any_size.py                       # 64, 128, 256: about 15 minutes on 2 cores
    .venv/bin/python bench/any_size.py --sizes 512 --images 1 --out bench/results/any-size-512.json

Writes ``bench/results/any-size.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import classical  # noqa: E402
from bench.common import HELD_OUT_SEED, add_noise, atomic_write_json  # noqa: E402
from guidance.solve import solve  # noqa: E402
from models.checkpoint import LoadedModel, load_models  # noqa: E402
from models.data import phantoms  # noqa: E402
from models.schedules import get_sigmas  # noqa: E402
from models.tiling import TiledDenoiser, grid_offset  # noqa: E402
from operators.blur import gaussian_kernel  # noqa: E402
from operators.spec import build_operator  # noqa: E402

TASKS = ("random_inpainting", "box_inpainting", "deblur", "sr4", "ct16")


def shepp_logan(n: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return np.clip(resize(shepp_logan_phantom(), (n, n), anti_aliasing=True), 0, 1)


def images(n: int, count: int) -> list[tuple[str, np.ndarray]]:
    out = [("shepp-logan", shepp_logan(n))]
    if count > 1:
        out += [(f"phantom-{i}", p[0]) for i, p in enumerate(phantoms(count - 1, n, HELD_OUT_SEED))]
    return out[:count]


def task_spec(task: str, n: int) -> dict:
    rng = np.random.default_rng(1)
    if task == "random_inpainting":
        return {"kind": "inpainting", "mask": (rng.random((n, n)) >= 0.7).astype(float)}
    if task == "box_inpainting":
        m, h = np.ones((n, n)), n * 24 // 64
        m[(n - h) // 2:(n + h) // 2, (n - h) // 2:(n + h) // 2] = 0
        return {"kind": "inpainting", "mask": m}
    if task == "deblur":
        return {"kind": "blur", "gaussian": {"sigma": 1.5, "size": 9}, "boundary": "circular"}
    if task == "sr4":
        return {"kind": "super_resolution", "factor": 4}
    return {"kind": "ct", "angles": 16}


def baseline(task: str, spec: dict, op, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    if spec["kind"] == "inpainting":
        return classical.biharmonic_inpaint(y[0], spec["mask"])
    if spec["kind"] == "blur":
        return classical.wiener_deconvolve(y[0], gaussian_kernel(1.5, 9), x)[0]
    if spec["kind"] == "super_resolution":
        return classical.bicubic_upsample(y[0], 4)
    return op.pseudo_inverse(torch.as_tensor(y)[None])[0, 0].numpy()  # filtered back-projection


def seam_ratio(mean: np.ndarray, sigma_last: float, tile: int) -> float:
    """Mean |Laplacian| on the last step's tile borders over the same inside the tiles."""
    lap = np.abs(4 * mean[1:-1, 1:-1] - mean[:-2, 1:-1] - mean[2:, 1:-1] - mean[1:-1, :-2] - mean[1:-1, 2:])
    oy, ox = grid_offset(sigma_last, (tile, tile))
    n = mean.shape[0]
    rows = {(r - 1) for k in range(-1, n // tile + 2) for r in (k * tile - oy, k * tile - oy - 1) if 1 <= r < n - 1}
    cols = {(c - 1) for k in range(-1, n // tile + 2) for c in (k * tile - ox, k * tile - ox - 1) if 1 <= c < n - 1}
    border = np.zeros(lap.shape, bool)
    border[sorted(rows), :] = True
    border[:, sorted(cols)] = True
    return float(lap[border].mean() / lap[~border].mean())


def run(model, mode: str, op, y, args) -> tuple[np.ndarray, float]:
    shape = tuple(op.in_shape)
    den = model.denoiser if mode == "whole" else TiledDenoiser(model.denoiser, shape)
    t = time.perf_counter()
    with torch.no_grad():
        s = solve(LoadedModel(model.card, den), op, y, noise_sigma=args.noise, method="fast",
                  params={"steps": args.steps, "cg_iters": args.cg_iters, "lam": 1.0}, seed=0)
    return s.mean[0], time.perf_counter() - t


def measure(model, n: int, args) -> list[dict]:
    rows = []
    sig = get_sigmas("karras", args.steps, model.denoiser.sigma_min, model.denoiser.sigma_max)
    for name, x in images(n, args.images):
        for task in args.tasks:
            spec = task_spec(task, n)
            op = build_operator(spec, (1, n, n))
            y = add_noise(op.forward(torch.as_tensor(x)[None, None]), args.noise, 7)[0]
            y = op.observed(y[None])[0]
            row = {"size": n, "image": name, "task": task,
                   "classical": classical.psnr(np.clip(baseline(task, spec, op, y.numpy(), x), 0, 1), x)}
            for mode in args.modes:
                if mode == "whole" and n % 8:
                    continue
                mean, sec = run(model, mode, op, y, args)
                row[mode] = classical.psnr(np.clip(mean, 0, 1), x)
                row[f"{mode}_s"] = sec
                row[f"{mode}_us_per_pixel"] = 1e6 * sec / n ** 2
                if mode == "tiles" and n > 64:
                    row["seam_ratio"] = seam_ratio(mean, float(sig[-2]), 64)
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| size | task | classical | tiles | whole | tiles s | whole s | seams |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["size"] for r in rows}):
        for task in TASKS:
            sel = [r for r in rows if r["size"] == n and r["task"] == task]
            if not sel:
                continue

            def avg(k):
                v = [r[k] for r in sel if k in r]
                return f"{np.mean(v):.2f}" if v else "-"
            lines.append(f"| {n} | {task} | {avg('classical')} | {avg('tiles')} | {avg('whole')} | "
                         f"{avg('tiles_s')} | {avg('whole_s')} | {avg('seam_ratio')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sizes (square)")
    p.add_argument("--images", type=int, default=2, help="images per size: Shepp-Logan, then ellipse phantoms")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to run")
    p.add_argument("--modes", nargs="+", default=["tiles", "whole"], choices=["tiles", "whole"],
                   help="tile by tile, or the network on the whole image")
    p.add_argument("--steps", type=int, default=30, help="fast sampler steps")
    p.add_argument("--cg-iters", type=int, default=0, help="fast's Kalman CG iterations (0: backprop-free)")
    p.add_argument("--noise", type=float, default=0.02, help="observation noise sigma")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "any-size.json"), help="results file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_models()["phantom-64"]
    rows = [r for n in args.sizes for r in measure(model, n, args)]
    atomic_write_json(Path(args.out), {"command": "bench/any_size.py " + " ".join(argv or sys.argv[1:]),
                                       "settings": {k: v for k, v in vars(args).items() if k != "out"},
                                       "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
