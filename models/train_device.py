"""Continue a committed training run on a lent GPU machine (``bench/train_device.sh`` runs this).

    python3 -m models.train_device --id darcy-64 --src checkpoints --work /tmp/w --out $OUT \\
        --batch 256 --time-limit-min 3.25
    python3 -m models.train_device --id phantom-64 --src checkpoints --work /tmp/w --out /tmp/o \\
        --device cpu --batch 4 --add-steps 3 --max-examples 8 --threads 1      # the CPU smoke

What it does, for one model ``ID``:

1. copies ``SRC/ID/{resume.safetensors, weights.safetensors, card.json}`` into ``WORK/ID`` (so
   the source is never written) and trains from there exactly as ``reconserve train --resume``
   does (:func:`models.train.run_train` with ``--out WORK/ID --runs-dir WORK/runs --resume``):
   model, EMA, Adam moments, step, RNG state and the saved config (``lr``, ``warmup``, EMA
   half-life, the ``steps`` target) are the committed ones; ``--batch`` (and optionally
   ``--lr``/``--steps``/``--add-steps``) override, and ``--time-limit-min`` bounds the call
   (data generation included: it happens inside ``run_train``);
2. copies the result (``weights.safetensors``, ``resume.safetensors``, ``card.json``) into
   ``OUT/ID/`` (a ``resume.safetensors`` larger than the device tool's 16 MiB a file would travel
   as ``resume.safetensors.gz``; ``bench/train_device_fetch.sh`` unpacks it) and merges a record
   into ``OUT/summary.json``;
3. ``--verify-steps K`` (default 1): resumes the returned files once more, on the **CPU**, in a
   scratch folder for ``K`` steps with batch 4, and checks the step count advanced: the
   CUDA -> CPU direction of the state, checked on the machine that wrote it.

It imports none of the service's packages: ``fastapi``, ``pydantic``, ``deepinv`` and the like
are blocked while it runs (so the CPU smoke fails where the bare GPU machine would). The PDE
solvers come from ``operators.pde_solvers``, which imports numpy and scipy only (the ``operators``
package imports its submodules lazily).

Data: the generated sets are those of the committed runs (``data``, ``num_examples``,
``data_seed`` from the saved config; ``models.data`` draws every sample in a fixed order from
``default_rng(seed)``). Darcy's GRFs and coefficients are drawn in one process, its solves
(the slow part: 10000 took 140 s on one core here) are spread over ``--workers`` processes, as
are the phantoms' chunks (the same 256-sample chunks, from uniforms drawn in one process); the
results equal ``models.data.generate`` bit for bit (tests/models/test_train_device.py).
``--max-examples M`` takes the first ``M`` examples instead (the first ``M`` of the full set);
the smoke uses it.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.abc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

FILES = ("resume.safetensors", "weights.safetensors", "card.json")
TRANSFER_LIMIT = 16 * 2 ** 20  # the device tool brings back files of at most 16 MiB
BLOCKED = ("fastapi", "starlette", "pydantic", "pydantic_core", "pydantic_settings", "deepinv", "uvicorn",
           "sqlalchemy", "ray", "service")


# ----------------------------------------------------------------------------- a bare environment
class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses the service's packages, as the bare GPU machine would (it lacks them)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not imported by models.train_device (the GPU machine lacks it)")
        return None


def block_service_imports() -> None:
    if not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker())


def tqdm_fallback() -> None:
    """``models.train`` shows a tqdm bar; a no-op one if tqdm is missing."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        mod = types.ModuleType("tqdm")

        class tqdm:  # noqa: N801
            def __init__(self, *a, **k):
                pass

            def update(self, n=1):
                pass

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                pass

        mod.tqdm = tqdm
        sys.modules["tqdm"] = mod


# ----------------------------------------------------------------------------- data
_CACHE: dict[tuple, tuple[np.ndarray, dict]] = {}


def _solve_darcy_chunk(mask: np.ndarray) -> np.ndarray:
    """``u`` (float32) for coefficients ``a = where(mask, 12, 3)`` (``mask = g >= 0``), as models.data does."""
    from models import data as D

    solve = D._solver("darcy")
    a = np.where(mask, D.DARCY_HIGH, D.DARCY_LOW)  # float64, the same values as darcy_coefficient(g)
    u = np.empty(mask.shape, dtype=np.float32)
    for i in range(len(a)):
        u[i] = solve(a[i])
    return u


def darcy_parallel(num: int, n: int, seed: int, workers: int = 1, alpha: float = 2.0,
                   tau: float = 3.0) -> np.ndarray:
    """``models.data.generate("darcy", num, n, seed)[0]`` with the solves spread over ``workers`` processes."""
    from models import data as D

    masks = np.concatenate([g >= 0 for g in D._grf_chunks(num, n, np.random.default_rng(seed), alpha, tau)])
    out = np.empty((num, 2, n, n), dtype=np.float32)
    out[:, 0] = np.where(masks, D.DARCY_HIGH, D.DARCY_LOW)
    workers = max(1, min(int(workers), num))
    if workers == 1:
        out[:, 1] = _solve_darcy_chunk(masks)
        return out
    import multiprocessing as mp

    step = -(-num // (workers * 4))  # a few chunks per worker
    chunks = [masks[i:i + step] for i in range(0, num, step)]
    with mp.get_context("fork").Pool(workers) as pool:  # fork: the children inherit the blocker
        out[:, 1] = np.concatenate(pool.map(_solve_darcy_chunk, chunks))
    return out


def _phantom_chunk(args) -> np.ndarray:
    from models import data as D

    u, n = args
    return D._phantom_chunk(u, n)


def phantom_parallel(num: int, n: int, seed: int, workers: int = 1) -> np.ndarray:
    """``models.data.generate("phantom", num, n, seed)[0]``, its chunks (the same ones) over ``workers`` processes."""
    from models import data as D

    u = np.random.default_rng(seed).random((num, D._P_FIELDS))  # the same stream as chunk by chunk
    chunks = [(u[i:i + D._CHUNK], n) for i in range(0, num, D._CHUNK)]
    workers = max(1, min(int(workers), len(chunks)))
    if workers == 1:
        return np.concatenate([_phantom_chunk(c) for c in chunks])
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return np.concatenate(pool.map(_phantom_chunk, chunks))


def make_loader(max_examples: int | None, workers: int):
    """A replacement for ``models.train.load_training_data``: generated data in memory, cached."""
    from models import data as D
    from models import train as T

    original = T.load_training_data

    def load(cfg: dict, run_dir: Path):
        if cfg["data"] not in D.KINDS:
            return original(cfg, run_dir)
        count = int(cfg["num_examples"]) if not max_examples else min(int(max_examples), int(cfg["num_examples"]))
        key = (cfg["data"], int(cfg["resolution"]), int(cfg["data_seed"]), count)
        if key not in _CACHE:
            t0 = time.time()
            part = "" if count == cfg["num_examples"] else f", the first of {cfg['num_examples']}"
            T._log(f"generating {count} {cfg['data']} examples at {cfg['resolution']}x{cfg['resolution']} "
                   f"(seed {cfg['data_seed']}{part}){f' with {workers} processes' if workers > 1 else ''}")
            if cfg["data"] == "darcy":
                arr = darcy_parallel(count, key[1], key[2], workers)
                meta = D._meta("darcy", count, key[1], key[2], {"alpha": 2.0, "tau": 3.0,
                                                                 "a_values": [D.DARCY_LOW, D.DARCY_HIGH], "f": 1.0})
            elif cfg["data"] == "phantom":
                arr = phantom_parallel(count, key[1], key[2], workers)
                meta = D._meta("phantom", count, key[1], key[2], {"value_range": [0.0, 1.0]})
            else:
                arr, meta = D.generate(cfg["data"], count, key[1], key[2])
            _CACHE[key] = (arr, meta)
            T._log(f"generated in {time.time() - t0:.1f} s")
        return _CACHE[key]

    return load


# ----------------------------------------------------------------------------- state files
def read_state(folder: Path) -> dict:
    """The JSON state in ``folder/resume.safetensors``'s metadata (step, config, history, ...)."""
    from safetensors import safe_open

    with safe_open(str(folder / "resume.safetensors"), "pt") as f:
        return json.loads((f.metadata() or {})["state"])


def copy_state(src: Path, dst: Path, tries: int = 5) -> None:
    """Copy the three files; retry if one does not parse (a trainer may be rewriting ``src``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries):
        for name in FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)
            elif (src / (name + ".gz")).exists():
                with gzip.open(src / (name + ".gz"), "rb") as fi, open(dst / name, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
            else:
                raise SystemExit(f"{src} has no {name}")
        try:
            read_state(dst)
            json.loads((dst / "card.json").read_text())
            return
        except Exception as e:  # noqa: BLE001 - a half-written file: try again
            if attempt == tries - 1:
                raise SystemExit(f"cannot read the state copied from {src}: {e}")
            time.sleep(1.0)


def export(work: Path, out: Path) -> dict:
    """Copy the result into ``out`` (gzip a file over the transfer limit); returns ``{name: bytes}``."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in FILES:
        for old in (out / name, out / (name + ".gz")):
            old.unlink(missing_ok=True)
        src = work / name
        if src.stat().st_size < TRANSFER_LIMIT - 1024:
            shutil.copy2(src, out / name)
            sizes[name] = (out / name).stat().st_size
        else:
            with open(src, "rb") as fi, gzip.open(out / (name + ".gz"), "wb", compresslevel=1) as fo:
                shutil.copyfileobj(fi, fo)
            sizes[name + ".gz"] = (out / (name + ".gz")).stat().st_size
            print(f"WARNING: {src} is {src.stat().st_size} bytes, over the device tool's 16 MiB: "
                  f"sent gzipped ({sizes[name + '.gz']} bytes)", flush=True)
    return sizes


def merge_summary(path: Path, model_id: str, record: dict) -> None:
    s = json.loads(path.read_text()) if path.exists() else {}
    s[model_id] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(s, indent=1) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- main
def train_args(ckpt: Path, runs: Path, a: argparse.Namespace, steps: int | None, **override) -> argparse.Namespace:
    from models import train as T

    o = {"device": a.device, "batch": a.batch, "threads": a.threads, "time_limit_min": a.time_limit_min,
         "lr": a.lr, "save_every": a.save_every, "log_every": a.log_every, **override}
    argv = ["--out", str(ckpt), "--runs-dir", str(runs), "--resume", "--device", o["device"],
            "--save-every", str(o["save_every"]), "--log-every", str(o["log_every"])]
    for flag, key in (("--batch", "batch"), ("--threads", "threads"), ("--time-limit-min", "time_limit_min"),
                      ("--lr", "lr")):
        if o[key] is not None:
            argv += [flag, str(o[key])]
    if steps is not None:
        argv += ["--steps", str(steps)]
    return T.add_train_arguments(argparse.ArgumentParser(prog="models.train_device")).parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m models.train_device", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--id", required=True, help="the model: SRC/ID holds its resume.safetensors, weights.safetensors, card.json")
    a("--src", default="checkpoints", help="folder holding ID/ [checkpoints]")
    a("--work", required=True, help="scratch folder (WORK/ID: the run; WORK/runs: run state)")
    a("--out", required=True, help="OUT/ID/ receives the three files, OUT/summary.json a record")
    a("--device", default="auto", help="cpu | cuda | auto [auto]")
    a("--batch", type=int, default=256, help="batch size [256]")
    a("--lr", type=float, default=None, help="Adam learning rate [the saved one]")
    a("--steps", type=int, default=None, help="total step target [the saved one]")
    a("--add-steps", type=int, default=None, help="step target = the resumed step + this (overrides --steps)")
    a("--time-limit-min", type=float, default=None, help="stop (saving) after this many minutes, data included")
    a("--threads", type=int, default=None, help="torch CPU threads [torch default]")
    a("--workers", type=int, default=None, help="processes for the Darcy solves [CPU count]")
    a("--max-examples", type=int, default=None, help="use the first M examples of the data set (smoke)")
    a("--save-every", type=int, default=250, help="periodic save every this many steps [250]")
    a("--log-every", type=int, default=100, help="log (and history) every this many steps [100]")
    a("--verify-steps", type=int, default=1, help="resume the result on the CPU for this many steps (0: skip) [1]")
    a("--no-tf32", action="store_true", help="CUDA: full float32 matrix products (TF32 is on by default)")
    a("--no-block", action="store_true", help="do not block the service's packages")
    return p


def _select_device(args: argparse.Namespace) -> str:
    """``args.device`` resolved (``auto``: CUDA when present); cuDNN autotuning and TF32 set for CUDA."""
    import torch

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    return dev


def _verify(args: argparse.Namespace, out: Path, end: int) -> dict:
    """Resume the returned files on the CPU for ``--verify-steps`` steps (CUDA-written state -> CPU)."""
    from models import train as T

    tv = time.time()
    with tempfile.TemporaryDirectory(prefix="train_device_verify_") as tmp:
        vck = Path(tmp) / args.id
        copy_state(out / args.id, vck)
        T.run_train(train_args(vck, Path(tmp) / "runs", args, end + args.verify_steps, device="cpu", batch=4,
                               threads=args.threads or min(4, os.cpu_count() or 1), time_limit_min=None,
                               save_every=0, log_every=args.verify_steps))
        vend = int(read_state(vck)["step"])
    return {"device": "cpu", "steps": args.verify_steps, "end_step": vend, "ok": vend == end + args.verify_steps,
            "seconds": round(time.time() - tv, 1)}


def _train(args: argparse.Namespace, ckpt: Path, runs: Path, steps: int | None, record: dict) -> int:
    """Run the training session; fill ``record`` with its step counts and speed; returns the end step."""
    import torch

    from models import train as T

    start, t0 = record["start_step"], time.time()
    T.run_train(train_args(ckpt, runs, args, steps))
    secs = time.time() - t0
    if args.device.startswith("cuda"):  # asked only now: CUDA stays uninitialized while the data workers fork
        record["env"]["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    st1 = read_state(ckpt)
    end = int(st1["step"])
    record.update(end_step=end, steps=end - start, seconds=round(secs, 1), loss_ema=st1.get("loss_ema"),
                  steps_per_s=round((end - start) / secs, 3), images_per_s=round((end - start) * args.batch / secs, 1))
    return end


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.no_block:
        block_service_imports()
    tqdm_fallback()
    import torch

    from models import train as T

    T.load_training_data = make_loader(args.max_examples, args.workers or os.cpu_count() or 1)
    args.device = dev = _select_device(args)
    src, work, out = Path(args.src) / args.id, Path(args.work), Path(args.out)
    ckpt, runs = work / args.id, work / "runs"
    if ckpt.exists() or (runs / args.id).exists():
        raise SystemExit(f"{ckpt} or {runs / args.id} exists: give an empty --work")
    copy_state(src, ckpt)
    st0 = read_state(ckpt)
    start, target = int(st0["step"]), int(st0["config"]["steps"])
    steps = start + args.add_steps if args.add_steps is not None else args.steps
    goal = steps if steps is not None else target
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": dev, "gpu": None,
           "cpus": os.cpu_count(), "tf32": dev.startswith("cuda") and not args.no_tf32}
    print(f"[train_device] {args.id}: from {src} at step {start} (target {goal}), batch {args.batch}, "
          f"lr {args.lr or st0['config']['lr']}, {env}", flush=True)
    record = {"id": args.id, "start_step": start, "target": goal, "batch": args.batch,
              "lr": args.lr or st0["config"]["lr"], "env": env, "status": "failed"}
    summary = out / "summary.json"
    if goal <= start:
        record.update(status="at target", end_step=start)
        merge_summary(summary, args.id, record)
        print(f"[train_device] {args.id}: already at its step target {goal}; nothing to train "
              f"(pass --steps or --add-steps)", flush=True)
        return 3
    end = _train(args, ckpt, runs, steps, record)
    if end <= start:
        merge_summary(summary, args.id, record)
        print(f"[train_device] {args.id}: no step was trained", flush=True)
        return 1
    record["files"] = export(ckpt, out / args.id)
    record["status"] = "trained"
    merge_summary(summary, args.id, record)
    print(f"[train_device] {args.id}: steps {start} -> {end} in {record['seconds']:.1f} s "
          f"({record['images_per_s']} images/s); wrote {record['files']} to {out / args.id}", flush=True)
    if args.verify_steps > 0:
        record["verify"] = v = _verify(args, out, end)
        merge_summary(summary, args.id, record)
        print(f"[train_device] {args.id}: resumed the returned state on the CPU: step {end} -> {v['end_step']} "
              f"({'ok' if v['ok'] else 'FAILED'})", flush=True)
        if not v["ok"]:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
