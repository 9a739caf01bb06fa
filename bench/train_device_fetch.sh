#!/usr/bin/env bash
# Copy what `bash bench/train_device.sh` brought back from the GPU machine into checkpoints/<id>/.
#
#     bash bench/train_device_fetch.sh [--dest DIR] [--runs-dir RUNS] [--force] [--dry-run] SRC [MODEL ...]
#
# SRC: the device reply's files_at folder (it holds MODEL/{weights.safetensors,
# resume.safetensors[.gz],card.json}, summary.json, train_device.log); MODEL: the folders of SRC
# to take [all]. DIR: where the checkpoints live [checkpoints]. For each model it checks, before
# touching DIR/MODEL: the three files belong together (resume state's step = the card's
# training.steps; weights = the EMA in the resume state), the step advanced past DIR/MODEL's,
# DIR/MODEL has not moved on since the device run started from it (its step is not beyond
# summary.json's start_step: a CPU run that went on meanwhile would be overwritten), and no
# `train` process is writing DIR/MODEL (it would overwrite the copy at its next save), and
# RUNS/MODEL/state.json (RUNS: [runs]; `reconserve train`'s own copy of the state) is not ahead of the fetched
# step (`--resume` takes the newer of the two).
# --force copies despite the step and process checks (never despite files that do not belong
# together); --dry-run only checks. Files are replaced one by one
# atomically (copy to NAME.fetch.tmp, then rename). It commits nothing: it prints the git lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" - "$@" <<'PY'
import argparse, gzip, json, os, shutil, sys, tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file  # numpy, not torch: quicker to start

p = argparse.ArgumentParser(prog="bench/train_device_fetch.sh")
p.add_argument("src")
p.add_argument("models", nargs="*")
p.add_argument("--dest", default="checkpoints")
p.add_argument("--runs-dir", default="runs", help="where `reconserve train` keeps runs/<id>/state.json [runs]")
p.add_argument("--force", action="store_true")
p.add_argument("--dry-run", action="store_true")
a = p.parse_intermixed_args()
src, dest = Path(a.src), Path(a.dest)
summary = json.loads((src / "summary.json").read_text()) if (src / "summary.json").exists() else {}
models = a.models or sorted(d.name for d in src.iterdir() if (d / "card.json").exists())
if not models:
    sys.exit(f"nothing to fetch in {src}")


def state_of(path: Path) -> dict:
    with safe_open(str(path), "np") as f:
        return json.loads((f.metadata() or {})["state"])


def writers(folder: Path) -> list[str]:
    """Running processes whose command line trains into ``folder`` (`--out folder`)."""
    found, want = [], folder.resolve()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if int(pid) == os.getpid() or not any("train" in x for x in argv[:4]):
            continue
        for i, x in enumerate(argv[:-1]):
            if x == "--out" and (cwd / argv[i + 1]).resolve() == want:
                found.append(f"pid {pid}: {' '.join(argv)[:160]}")
    return found


failed, done = [], []
with tempfile.TemporaryDirectory(prefix="train_device_fetch_") as tmp:
    for m in models:
        s, d = src / m, dest / m
        files = {}
        for name in ("weights.safetensors", "resume.safetensors", "card.json"):
            if (s / name).exists():
                files[name] = s / name
            elif (s / (name + ".gz")).exists():  # sent gzipped (over the transfer limit)
                files[name] = Path(tmp) / f"{m}-{name}"
                with gzip.open(s / (name + ".gz"), "rb") as fi, open(files[name], "wb") as fo:
                    shutil.copyfileobj(fi, fo)
        missing = {"weights.safetensors", "resume.safetensors", "card.json"} - files.keys()
        if missing:
            failed.append(f"{m}: {s} lacks {sorted(missing)}")
            continue
        st = state_of(files["resume.safetensors"])
        card = json.loads(files["card.json"].read_text())
        step, why = int(st["step"]), []
        if card.get("id") != m:
            why.append(f"the card's id is {card.get('id')!r}")
        if int(card["training"]["steps"]) != step:
            why.append(f"card steps {card['training']['steps']} != resume step {step}")
        w, r = load_file(str(files["weights.safetensors"])), load_file(str(files["resume.safetensors"]))
        ema = {k[4:]: v for k, v in r.items() if k.startswith("ema.")}
        if w.keys() != ema.keys() or not all(np.array_equal(w[k], ema[k]) for k in w):
            why.append("weights.safetensors is not the EMA of resume.safetensors")
        start = (summary.get(m) or {}).get("start_step")
        old = state_of(d / "resume.safetensors")["step"] if (d / "resume.safetensors").exists() else None
        hard = list(why)
        if old is not None and old >= step:
            why.append(f"{d} is at step {old}, not behind the fetched {step}")
        if old is not None and start is not None and old > start:
            why.append(f"{d} moved on to step {old} since the device run started from step {start}")
        rs = Path(a.runs_dir) / m / "state.json"  # `--resume` takes the newer of this and resume.safetensors
        if rs.exists() and json.loads(rs.read_text())["step"] >= step:
            why.append(f"{rs} is at step {json.loads(rs.read_text())['step']}: a later --resume would pick it, "
                       f"not the fetched step {step}")
        busy = writers(d)
        if busy:
            why.append(f"a training process writes {d}: {busy}")
        if hard or (why and not a.force):
            failed.append(f"{m}: " + "; ".join(why) + ("" if hard else " (--force to copy anyway)"))
            continue
        print(f"{m}: step {old} -> {step} (device run: {start} -> {step}, "
              f"{card['training'].get('hardware')}, batch {card['training'].get('batch')}, "
              f"loss ema {st.get('loss_ema')})" + (f"; forced past: {'; '.join(why)}" if why else ""))
        if a.dry_run:
            continue
        d.mkdir(parents=True, exist_ok=True)
        for name in ("resume.safetensors", "weights.safetensors", "card.json"):  # resume first: a
            tmpf = d / (name + ".fetch.tmp")                                  # --resume picks the newest
            shutil.copyfile(files[name], tmpf)
            tmpf.replace(d / name)
        done.append(m)
for f in failed:
    print(f"NOT fetched: {f}", file=sys.stderr)
if done:
    paths = " ".join(f"{dest}/{m}" for m in done)
    print(f"copied into {paths}. Next (not run here):\n"
          f"  .venv/bin/python bench/phantom_tasks.py   # if phantom-64 changed\n"
          f"  .venv/bin/python bench/darcy_tasks.py     # if darcy-64 changed\n"
          f"  git add {paths} && git commit -m 'checkpoints: continue training on a GPU (bench/train_device.sh)'\n"
          f"  resume on the CPU with an explicit batch: reconserve train ... --resume --batch 16")
sys.exit(1 if failed else 0)
PY
