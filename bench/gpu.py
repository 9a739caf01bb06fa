"""The GPU path, measured: network calls, sampler overhead, peak memory, batching gain.

    python bench/gpu.py --device cuda --out $OUT/gpu.json   # a lent GPU (bench/gpu_device.sh runs it)
    python bench/gpu.py --smoke --device cpu                 # seconds; the test suite runs this

Models: ``phantom-64`` (``checkpoints/``) and a random-weight 256 x 256 RGB guided-diffusion
U-Net (``models.adapters.adm_denoiser``: deepinv's ``DiffUNet``, FFHQ architecture, ~94M
parameters). The ADM U-Net needs deepinv: where it does not import (a bare GPU machine with no
carried wheels, see ``bench/gpu_wheels.sh``) that model is skipped and the JSON says why.

Sections, per model:

1. ``network``: seconds per denoiser call as the samplers make it (preconditioning included,
   state in ``core.state_dtype``), ``forward`` (no grad) and ``forward_backward`` (plus the
   vector-Jacobian product w.r.t. the input, as fast/dps/diffusion_pde take it), at batch
   1/8/32, for each variant: ``fp32``, ``channels_last``, ``bf16`` (autocast) + channels_last,
   and with ``--compile`` ``torch.compile`` on top (``models.denoiser.NetworkOptions``); the
   peak memory of each (``torch.cuda.max_memory_allocated``, CUDA only).
2. ``sampler``: each method's wall time on a batch of ``--overhead-batch`` samples (one
   inpainting problem) through ``guidance.driver.sample_batch``, over the bare network time of
   the same calls (``nfe`` x the section-1 time per call of the kind the method makes: forward
   for ald, forward+backward for the others), in the fastest fp32 variant; target <= 1.15x.
   On CUDA also the host synchronisations per step (``torch.cuda.set_sync_debug_mode``, counted
   over two run lengths so set-up and the final read do not count).
3. ``batching``: ``--jobs`` concurrent jobs (one sample each, own seed and inpainting mask, hence
   a ``BatchedOperator``) through one ``sample_batch``, as the service's worker runs them, vs the
   same jobs one ``sample_batch`` each; gain = time of the singles / time of the batch, and
   the largest difference between a job's batched and lone sample.

A time budget (``--budget-s``) bounds the whole run: a measurement that would start past it is
recorded as skipped. Prints tables and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guidance.core import state_dtype  # noqa: E402
from guidance.driver import BatchItem, sample_batch  # noqa: E402
from guidance.solve import Plan, make_plan  # noqa: E402
from models.checkpoint import LoadedModel, load_checkpoint  # noqa: E402
from models.denoiser import NetworkOptions, configure_network  # noqa: E402
from operators.imaging import Inpainting  # noqa: E402

#: Variants of section 1 (``--compile`` adds ``bf16_cl_compile``).
VARIANTS = {
    "fp32": NetworkOptions(),
    "channels_last": NetworkOptions(channels_last=True),
    "bf16_cl": NetworkOptions(autocast="bf16", channels_last=True),
    "fp16_cl": NetworkOptions(autocast="fp16", channels_last=True),
    "bf16_cl_compile": NetworkOptions(autocast="bf16", channels_last=True, compile=True),
}
#: Sampler parameters of section 2 (full run; ``--smoke`` cuts the steps).
SAMPLER_PARAMS = {
    "fast": {"steps": 20},
    "dps": {"steps": 20},
    "ald": {"steps": 10, "corrector_steps": 1, "final_corrector_steps": 5},
    "diffusion_pde": {"steps": 10},
}
#: Which network call each method makes (section 2's bare time).
CALL_KIND = {"fast": "forward_backward", "dps": "forward_backward", "ald": "forward",
             "diffusion_pde": "forward_backward"}
NOISE = 0.05
TARGET_OVERHEAD = 1.15


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def timed(fn, device, *, reps: int, warmup: int, max_s: float) -> dict:
    """Median seconds of ``fn`` (after ``warmup`` calls), at most ``reps`` timed calls and about
    ``max_s`` seconds of them (at least one)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts: list[float] = []
    stop = time.perf_counter() + max_s
    while len(ts) < reps:
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() > stop:
            break
    return {"s": statistics.median(ts), "min_s": min(ts), "reps": len(ts)}


def count_syncs(fn, device) -> int | None:
    """Host-device synchronisations made by ``fn`` (CUDA's sync debug mode), None elsewhere."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in seen)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure(e: BaseException) -> dict:
    if is_oom(e):
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return {"error": "out_of_memory"}
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            "trace": traceback.format_exc(limit=3)[-1500:]}


# ----------------------------------------------------------------------------- models
def phantom_model(device) -> LoadedModel:
    return load_checkpoint(ROOT / "checkpoints" / "phantom-64", device)


def adm_model(device, size: int) -> LoadedModel:
    """A random-weight guided-diffusion U-Net (FFHQ architecture, RGB, learned sigma) at ``size``."""
    from models.adapters import adm_denoiser  # deepinv is imported inside

    torch.manual_seed(0)
    den = adm_denoiser(None, in_channels=3, image_size=size).to(device).eval()
    for p in den.parameters():
        p.requires_grad_(False)
    card = {"id": f"adm-{size}-random", "kind": "image", "shape": [3, size, size],
            "channels": ["r", "g", "b"], "normalization": {"shift": [0.5] * 3, "scale": [0.5] * 3},
            "sigma_min": den.sigma_min, "sigma_max": den.sigma_max, "methods": [{"name": "fast"}]}
    return LoadedModel(card, den)


def deepinv_status() -> tuple[bool, str]:
    try:
        import deepinv  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: skip ADM
        return False, f"deepinv does not import here ({type(e).__name__}: {e}); ADM skipped"
    return True, f"deepinv {getattr(deepinv, '__version__', '?')}"


# ----------------------------------------------------------------------------- section 1
def bench_network(model, device, variants, batches, args, budget) -> list[dict]:
    den = model.denoiser
    shape = tuple(den.shape)
    dt = state_dtype(device)
    sigma = 1.0
    rows = []
    for vname in variants:
        opts = VARIANTS[vname]
        try:
            configure_network(den, opts)
        except Exception as e:  # noqa: BLE001
            rows.append({"variant": vname, **failure(e)})
            continue
        for b in batches:
            g = torch.Generator(device=device).manual_seed(b)
            x = torch.randn((b,) + shape, generator=g, dtype=dt, device=device) * 1.5
            v = torch.randn((b,) + shape, generator=g, dtype=dt, device=device)

            def fwd():
                with torch.no_grad():
                    den(x, sigma)

            def fwd_bwd():
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    out = den(xg, sigma)
                    torch.autograd.grad(out, xg, grad_outputs=v)

            for mode, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
                row = {"variant": vname, "batch": b, "mode": mode}
                if budget.left() < args.reserve_s:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                try:
                    reset_peak(device)
                    warm = args.warmup + (2 if opts.compile else 0)
                    t = timed(fn, device, reps=args.reps, warmup=warm, max_s=args.max_measure_s)
                    row.update(t, per_sample_s=t["s"] / b, peak_mib=peak_mib(device))
                except Exception as e:  # noqa: BLE001 - an OOM at batch 32 is a result
                    row.update(failure(e))
                rows.append(row)
    configure_network(den, NetworkOptions())
    return rows


def network_time(rows, variant: str, batch: int, mode: str) -> float | None:
    for r in rows:
        if (r.get("variant"), r.get("batch"), r.get("mode")) == (variant, batch, mode) and "s" in r:
            return r["s"]
    return None


def best_fp32_variant(rows, batch: int) -> str:
    """The faster of fp32 / channels_last at ``batch`` (forward+backward): the sampler runs it."""
    cands = [(network_time(rows, v, batch, "forward_backward"), v) for v in ("fp32", "channels_last")]
    cands = [(t, v) for t, v in cands if t is not None]
    return min(cands)[1] if cands else "fp32"


# ----------------------------------------------------------------------------- problems
def inpainting_problem(model, seed: int, frac: float = 0.3):
    c, h, w = model.denoiser.shape
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand((h, w), generator=g) < frac).double()
    op = Inpainting((c, h, w), mask)
    x = torch.rand((1, c, h, w), generator=g, dtype=torch.float64)  # physical units, in [0, 1]
    y = op.forward(x)[0] + NOISE * torch.randn(op.obs_shape, generator=g, dtype=torch.float64)
    return op, y


def plan_for(model, name: str, params: dict) -> Plan:
    return make_plan(name, params, model.denoiser)


def with_steps(name: str, params: dict, steps: int) -> dict:
    p = dict(params, steps=steps)
    if name == "ald":
        p["final_corrector_steps"] = min(p.get("final_corrector_steps", 5), steps)
    return p


# ----------------------------------------------------------------------------- section 2
def sampler_runs(net_rows, methods, args) -> list[tuple[str, str]]:
    """(variant, method) pairs of section 2: every method in the main variant (``--sampler-variant``,
    default the faster fp32 one), then ``fast`` in each ``--extra-sampler-variants``."""
    main = args.sampler_variant or best_fp32_variant(net_rows, args.overhead_batch)
    runs = [(main, m) for m in methods]
    runs += [(v, "fast") for v in args.extra_sampler_variants if v != main and "fast" in methods]
    return runs


def bench_sampler(model, device, net_rows, methods, args, budget) -> list[dict]:
    b = args.overhead_batch
    op, y = inpainting_problem(model, 1)
    rows = []
    for variant, name in sampler_runs(net_rows, methods, args):
        configure_network(model.denoiser, VARIANTS[variant])
        params = SAMPLER_PARAMS[name] if not args.smoke else with_steps(name, SAMPLER_PARAMS[name], 2)
        if args.steps_scale != 1.0:
            params = with_steps(name, params, max(2, round(params["steps"] * args.steps_scale)))
        row = {"method": name, "params": params, "batch": b, "network_variant": variant}
        if budget.left() < args.reserve_s:
            rows.append({**row, "skipped": "time budget"})
            continue
        plan = plan_for(model, name, params)
        item = [BatchItem(op, y, b, 7)]
        out = {}

        def run(plan=plan, item=item):
            out["run"] = sample_batch(model, plan, item, noise_sigma=NOISE, device=device)

        try:
            run()  # warm-up (kernels, allocator, cuDNN autotune)
            reset_peak(device)
            t = timed(run, device, reps=args.sampler_reps, warmup=0, max_s=args.max_measure_s)
            nfe = out["run"].nfe
            per_call = network_time(net_rows, variant, b, CALL_KIND[name])
            bare = per_call * nfe if per_call is not None else None
            row.update(t, nfe=nfe, peak_mib=peak_mib(device),
                       finite=bool(all(torch.isfinite(s).all() for s in out["run"].samples)),
                       sample_dtype=str(out["run"].samples[0].dtype).replace("torch.", ""),
                       bare_network_s=bare, overhead=(t["s"] / bare) if bare else None)
            if device.type == "cuda" and not args.no_sync_count:
                n1 = count_syncs(run, device)
                plan2 = plan_for(model, name, with_steps(name, params, 2 * params["steps"]))
                n2 = count_syncs(lambda: run(plan2), device)
                steps_added = len(plan2.sigmas) - len(plan.sigmas)
                row.update(syncs_run=n1, syncs_per_step=(n2 - n1) / max(steps_added, 1))
        except Exception as e:  # noqa: BLE001
            row.update(failure(e))
        rows.append(row)
    configure_network(model.denoiser, NetworkOptions())
    return rows


# ----------------------------------------------------------------------------- section 3
def bench_batching(model, device, variant: str, args, budget) -> dict:
    n, steps = args.jobs, (2 if args.smoke else args.batching_steps)
    params = {"steps": steps}
    row = {"method": "fast", "params": params, "jobs": n, "network_variant": variant}
    if budget.left() < args.reserve_s:
        return {**row, "skipped": "time budget"}
    plan = plan_for(model, "fast", params)
    items = []
    for j in range(n):
        op, y = inpainting_problem(model, 100 + j, 0.2 + 0.3 * j / max(n - 1, 1))
        items.append(BatchItem(op, y, 1, 1000 + j))
    out = {}

    def batched():
        out["b"] = sample_batch(model, plan, items, noise_sigma=NOISE, device=device)

    def singles():
        out["s"] = [sample_batch(model, plan, [it], noise_sigma=NOISE, device=device) for it in items]

    try:
        configure_network(model.denoiser, VARIANTS[variant])
        batched()
        singles()  # warm-up of both shapes
        reset_peak(device)
        tb = timed(batched, device, reps=args.sampler_reps, warmup=0, max_s=args.max_measure_s)
        peak_b = peak_mib(device)
        ts = timed(singles, device, reps=args.sampler_reps, warmup=0, max_s=args.max_measure_s)
        diff = max(float((out["b"].samples[j] - out["s"][j].samples[0]).abs().max()) for j in range(n))
        row.update(batched_s=tb["s"], singles_s=ts["s"], gain=ts["s"] / tb["s"],
                   jobs_per_s_batched=n / tb["s"], jobs_per_s_singles=n / ts["s"], peak_mib_batched=peak_b,
                   nfe_batched=out["b"].nfe, max_abs_diff_batched_vs_alone=diff)
    except Exception as e:  # noqa: BLE001
        row.update(failure(e))
    configure_network(model.denoiser, NetworkOptions())
    return row


# ----------------------------------------------------------------------------- report
def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        if unit == "ms":
            return f"{1e3 * v:.2f}"
        return f"{v:.3g}"
    return str(v)


def print_tables(result: dict) -> None:
    print(f"\n# GPU bench: {result['env']['device_name']} ({result['env']['device']}), "
          f"torch {result['env']['torch']}, state dtype {result['env']['state_dtype']}")
    for m in result["models"]:
        print(f"\n## {m['id']}  {m.get('shape', '')}  {m.get('skipped', '')}")
        if "error" in m:
            print(f"   error: {m['error']}")
        if m.get("network"):
            print("\nnetwork call       variant          batch   ms/call   ms/sample   peak MiB")
            for r in m["network"]:
                if "s" in r:
                    print(f"{r['mode']:<18} {r['variant']:<16} {r['batch']:>5} {fmt(r['s'], 'ms'):>9} "
                          f"{fmt(r['per_sample_s'], 'ms'):>11} {fmt(r['peak_mib']):>10}")
                else:
                    print(f"{r.get('mode', ''):<18} {r['variant']:<16} {r.get('batch', ''):>5}   "
                          f"{r.get('skipped') or r.get('error')}")
        if m.get("sampler"):
            print("\nsampler        variant          batch  nfe   s/run    bare net s  overhead  syncs/step  peak MiB")
            for r in m["sampler"]:
                if "s" in r:
                    print(f"{r['method']:<14} {r['network_variant']:<16} {r['batch']:>5} {r['nfe']:>4} {r['s']:>8.3f} "
                          f"{fmt(r.get('bare_network_s')):>12} {fmt(r.get('overhead')):>9} "
                          f"{fmt(r.get('syncs_per_step')):>11} {fmt(r.get('peak_mib')):>9}")
                else:
                    print(f"{r['method']:<14} {r.get('skipped') or r.get('error')}")
            print(f"(overhead = sampler time / bare network time of the same calls; target <= {TARGET_OVERHEAD}x)")
        b = m.get("batching")
        if b:
            if "gain" in b:
                print(f"\nbatching: {b['jobs']} jobs, fast {b['params']['steps']} steps: one batch "
                      f"{b['batched_s']:.3f} s, one at a time {b['singles_s']:.3f} s, gain {b['gain']:.2f}x "
                      f"(max |batched - alone| {b['max_abs_diff_batched_vs_alone']:.2e})")
            else:
                print(f"\nbatching: {b.get('skipped') or b.get('error')}")


def env_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "state_dtype": str(state_dtype(device)).replace("torch.", ""),
            "device_name": platform.processor() or platform.machine(), "cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, total_mib=round(p.total_memory / 2**20),
                    multiprocessors=p.multi_processor_count)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - a copy of the tree without .git
        info["commit"] = None
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CPU test)")
    p.add_argument("--models", default=None, help="comma list of phantom-64, adm (default: both; smoke: phantom-64)")
    p.add_argument("--adm-size", type=int, default=256)
    p.add_argument("--batches", default=None, help="comma list (default 1,8,32; smoke 1,2)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {sorted(VARIANTS)} (default fp32,channels_last,bf16_cl on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="add the bf16_cl_compile variant (phantom-64 only)")
    p.add_argument("--methods", default=",".join(SAMPLER_PARAMS))
    p.add_argument("--sampler-variant", default=None,
                   help="network variant of sections 2 and 3 (default: the faster of fp32 / channels_last)")
    p.add_argument("--extra-sampler-variants", default=None,
                   help="variants in which `fast` also runs in section 2 (default bf16_cl on CUDA, none on CPU)")
    p.add_argument("--overhead-batch", type=int, default=None, help="sampler batch (default 8; smoke 2)")
    p.add_argument("--jobs", type=int, default=None, help="concurrent jobs of section 3 (default 8; smoke 2)")
    p.add_argument("--batching-steps", type=int, default=20)
    p.add_argument("--no-batching", action="store_true", help="skip section 3")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every sampler's steps")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sampler-reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-measure-s", type=float, default=6.0, help="timed seconds per measurement (about)")
    p.add_argument("--budget-s", type=float, default=400.0, help="the whole run; later measurements are skipped")
    p.add_argument("--reserve-s", type=float, default=5.0, help="no measurement starts with less budget left")
    p.add_argument("--no-sync-count", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (smoke: 1)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.models = (args.models or ("phantom-64" if smoke else "phantom-64,adm")).split(",")
    args.batches = [int(b) for b in (args.batches or ("1,2" if smoke else "1,8,32")).split(",")]
    dev = torch.device(args.device)
    default_variants = "fp32" if dev.type != "cuda" else "fp32,channels_last,bf16_cl"
    args.variants = (args.variants or default_variants).split(",")
    if args.compile and "bf16_cl_compile" not in args.variants:
        args.variants.append("bf16_cl_compile")
    extra = args.extra_sampler_variants
    args.extra_sampler_variants = [v for v in (extra if extra is not None else
                                               ("bf16_cl" if dev.type == "cuda" else "")).split(",") if v]
    unknown = [v for v in args.variants + args.extra_sampler_variants + [args.sampler_variant or "fp32"]
               if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    args.methods = [m for m in args.methods.split(",") if m]
    args.overhead_batch = args.overhead_batch or (2 if smoke else 8)
    args.jobs = args.jobs or (2 if smoke else 8)
    if smoke:
        args.reps, args.sampler_reps, args.warmup, args.max_measure_s = 1, 1, 1, 0.5
        args.no_sync_count = True
        args.threads = args.threads or 1
        if args.overhead_batch not in args.batches:
            args.batches.append(args.overhead_batch)
    elif args.overhead_batch not in args.batches:
        args.batches.append(args.overhead_batch)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    t_start = time.perf_counter()
    result = {"bench": "gpu", "smoke": args.smoke, "env": env_info(device),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "target_overhead": TARGET_OVERHEAD, "models": []}

    def save(final: bool = False) -> None:  # after every section: a killed run keeps what it measured
        result["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        result["complete"] = final
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    try:
        run_models(args, device, budget, result, t_start, save)
    except KeyboardInterrupt:  # `timeout --signal=INT`: report what there is
        result["interrupted"] = True
        print("[gpu bench] interrupted: reporting what was measured", flush=True)
    save(final=not result.get("interrupted"))
    print_tables(result)
    print(f"\n[gpu bench] done in {result['elapsed_s']} s", flush=True)
    if args.out is not None:
        print(f"[gpu bench] wrote {args.out}")
    return result


def run_models(args, device, budget, result, t_start, save) -> None:
    for mid in args.models:
        entry: dict = {"id": mid}
        result["models"].append(entry)
        if budget.left() < args.reserve_s:
            entry["skipped"] = "time budget"
            continue
        try:
            if mid == "phantom-64":
                model = phantom_model(device)
            elif mid == "adm":
                ok, why = deepinv_status()
                entry["deepinv"] = why
                if not ok:
                    entry["skipped"] = why
                    print(f"[gpu bench] {why}", flush=True)
                    continue
                model = adm_model(device, args.adm_size)
                entry["id"] = model.id
            else:
                raise ValueError(f"unknown model {mid!r}: phantom-64 or adm")
        except Exception as e:  # noqa: BLE001
            entry.update(failure(e))
            continue
        entry["shape"] = list(model.denoiser.shape)
        entry["parameters"] = sum(p.numel() for p in model.denoiser.parameters())
        variants = [v for v in args.variants if not (VARIANTS[v].compile and mid != "phantom-64")]
        print(f"[gpu bench] {entry['id']}: network ({time.perf_counter() - t_start:.0f} s)", flush=True)
        entry["network"] = bench_network(model, device, variants, args.batches, args, budget)
        save()
        print(f"[gpu bench] {entry['id']}: sampler ({time.perf_counter() - t_start:.0f} s)", flush=True)
        entry["sampler"] = bench_sampler(model, device, entry["network"], args.methods, args, budget)
        save()
        variant = args.sampler_variant or best_fp32_variant(entry["network"], args.overhead_batch)
        if not args.no_batching:
            print(f"[gpu bench] {entry['id']}: batching ({time.perf_counter() - t_start:.0f} s)", flush=True)
            entry["batching"] = bench_batching(model, device, variant, args, budget)
            save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
