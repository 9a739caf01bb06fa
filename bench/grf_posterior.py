"""Where each sampler lands against the exact posterior of the analytic grf-32 prior.

    .venv/bin/python bench/grf_posterior.py [--samples 32] [--methods ald,dps,fast,diffusion_pde]

Prints, for 25 %-observed inpainting and 7x7 Gaussian blur (sigma 1.5, circular) with
noise 0.1: the relative L2 error of the sample mean against the exact posterior mean, the
median per-pixel std over the exact one, the coverage of the method's 95 % band (the fraction
of pixels where an independent exact posterior sample falls within the samples' mean +- 1.96
std; 64 exact draws averaged), and the network evaluations; plus the same figures for exact
posterior samples (the Monte Carlo floor for this many samples). Method parameters are the
sampler's defaults unless given (``fast:steps=50:lam=0.000001`` is grf-32's card setting).
Every method of the registry runs (``diffusion_pde`` without a PDE: its observation term only).
Writes ``bench/results/grf-posterior.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, atomic_write_json  # noqa: E402
from guidance.exact import dense_matrix, gaussian_posterior  # noqa: E402
from guidance.registry import METHODS  # noqa: E402
from models.denoiser import CountingDenoiser  # noqa: E402
from models.grf import GRFDenoiser  # noqa: E402
from models.schedules import get_sigmas  # noqa: E402
from operators.blur import Blur  # noqa: E402
from operators.imaging import Inpainting  # noqa: E402

NOISE = 0.1


def problems(den, cov):
    g = torch.Generator().manual_seed(0)
    x_true = den.sample_prior(1, g)
    ops = {"inpainting 25%": Inpainting((1, 32, 32), (torch.rand((32, 32), generator=g) < 0.25).double()),
           "blur 7x7 s1.5": Blur((1, 32, 32), gaussian={"sigma": 1.5, "size": 7})}
    for name, op in ops.items():
        y = op.forward(x_true) + NOISE * torch.randn(op.forward(x_true).shape, generator=g, dtype=torch.float64)
        a = dense_matrix(op)
        rows = np.abs(a).sum(1) > 0
        mean, c = gaussian_posterior(cov, a[rows], y.reshape(-1).numpy()[rows], NOISE)
        yield name, op, y, mean, c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--methods", default="ald,dps,diffusion_pde,fast,fast:steps=50,fast:steps=50:lam=0.000001")
    ap.add_argument("--out", default=str(RESULTS / "grf-posterior.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    den = GRFDenoiser(32)
    cov = den.covariance()
    rows = []
    print(f"{'problem':16s} {'method':30s} {'mean err':>9s} {'std ratio':>10s} {'cover95':>8s} {'nfe':>6s} {'time s':>7s}")
    for name, op, y, mean, c in problems(den, cov):
        std = np.sqrt(np.clip(np.diag(c), 0, None))
        chol = np.linalg.cholesky(c + 1e-10 * np.eye(len(c)))
        draws = mean + (chol @ np.random.default_rng(99).standard_normal((len(c), 64))).T  # for coverage

        def row(label, xs, nfe="-", secs="-"):
            m, sd = xs.mean(0), xs.std(0, ddof=1)
            err = np.linalg.norm(m - mean) / np.linalg.norm(mean)
            ratio = np.median(sd) / np.median(std)
            cover = float((np.abs(draws - m) <= 1.96 * sd).mean())
            rows.append({"problem": name, "method": label, "mean_err": float(err), "std_ratio": float(ratio),
                         "coverage95": cover, "nfe": nfe, "seconds": secs, "samples": args.samples})
            print(f"{name:16s} {label:30s} {err:9.3f} {ratio:10.3f} {cover:8.3f} {nfe:>6} {secs:>7}")
        row("exact samples", mean + (chol @ np.random.default_rng(0).standard_normal((len(c), args.samples))).T)
        for spec in args.methods.split(","):
            mname, *kv = spec.split(":")
            params = {k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in kv)}
            m = METHODS[mname]
            cfg = m.make_config(params)
            cd = CountingDenoiser(den)
            t = time.perf_counter()
            xs = m.sampler(cd, op, y.expand((args.samples,) + y.shape[1:]).clone(),
                           get_sigmas(cfg.schedule, cfg.steps, den.sigma_min, den.sigma_max), config=cfg,
                           generator=torch.Generator().manual_seed(1), noise_sigma=NOISE)
            row(spec, xs.reshape(args.samples, -1).numpy(), cd.nfe, f"{time.perf_counter() - t:.1f}")
    atomic_write_json(Path(args.out), {"noise": NOISE, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
