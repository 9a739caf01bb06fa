"""The flow-matching prior against the EDM prior at equal training budget (issue 12), on the four phantom tasks.

    .venv/bin/python bench/flow_vs_edm.py                 # every budget in AT (about 10 min each, 1 thread)
    .venv/bin/python bench/flow_vs_edm.py --budgets 1948  # one budget
    .venv/bin/python bench/flow_vs_edm.py --table         # only print the table of the results present

``phantom-64`` (EDM) and ``phantom-flow-64`` (flow matching) are the same 1.0M-parameter U-Net,
trained on the same phantoms with the same batch (16), learning rate, warm-up and EMA; only the
objective differs. For each budget (training steps) both checkpoints are taken from the commit
that holds them (``git show``: card and weights into a scratch folder, the step count checked), so
a run does not depend on what ``checkpoints/`` holds today, and each runs ``bench/phantom_tasks.py``
on the same 10 held-out cases, observations and method settings: ``fast`` 50 steps with the tuned
``cg_iters``/``lam`` of ``bench/results/phantom-64-tune.json``, and the backprop-free setting.
Results: ``bench/results/flow-vs-edm/<model>-step<N>.json``; the table gives each prior's mean PSNR
and the paired difference (flow - EDM) over the cases, mean +- its standard error.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import phantom_tasks  # noqa: E402
from bench.common import RESULTS, ROOT  # noqa: E402
from models.checkpoint import CARD, WEIGHTS  # noqa: E402

OUT = RESULTS / "flow-vs-edm"
METHODS = ("fast:steps=50", "fast:steps=50:cg_iters=0:eta=100:schedule=vp_cosine:lam=3")
LABELS = {METHODS[0]: "`fast` 50", METHODS[1]: "`fast` 50, no backprop"}
EDM, FLOW = "phantom-64", "phantom-flow-64"
#: budget (training steps) -> the commit holding each model at that step count
AT = {1948: {EDM: "a9cd160", FLOW: "0505136"},
      5162: {EDM: "dcc3f59", FLOW: "fa52531"}}


def checkout(model: str, rev: str, steps: int, dest: Path) -> Path:
    """``checkpoints/<model>/{card.json, weights}`` as of ``rev`` into ``dest/<model>-step<steps>``."""
    folder = dest / f"{model}-step{steps}"
    folder.mkdir(parents=True)
    for name in (CARD, WEIGHTS):
        blob = subprocess.run(["git", "show", f"{rev}:checkpoints/{model}/{name}"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        (folder / name).write_bytes(blob)
    found = json.loads((folder / CARD).read_text())["training"]["steps"]
    if found != steps:
        raise SystemExit(f"{model} at {rev} has {found} training steps, not {steps}")
    return folder


def run_budget(steps: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for model, rev in AT[steps].items():
            folder = checkout(model, rev, steps, Path(tmp))
            print(f"== {model} at {steps} steps ({rev})", file=sys.stderr, flush=True)
            phantom_tasks.main(["--model", str(folder), "--cases", "10", "--tuned",
                                str(RESULTS / "phantom-64-tune.json"), "--methods", ",".join(METHODS),
                                "--out", str(OUT / f"{model}-step{steps}.json"), "--threads", str(threads), "--quiet"])


def table() -> str:
    lines = ["| training steps | task | method | EDM PSNR | flow PSNR | flow - EDM (mean +- s.e.) |",
             "|---|---|---|---|---|---|"]
    for steps in sorted(AT):
        paths = {m: OUT / f"{m}-step{steps}.json" for m in (EDM, FLOW)}
        if not all(p.exists() for p in paths.values()):
            continue
        data = {m: json.loads(p.read_text())["tasks"] for m, p in paths.items()}
        for task, d in data[EDM].items():
            for label in METHODS:
                a = np.asarray(d["methods"][label]["psnr"])
                b = np.asarray(data[FLOW][task]["methods"][label]["psnr"])
                diff = b - a
                se = diff.std(ddof=1) / np.sqrt(len(diff))
                lines.append(f"| {steps} | {task} | {LABELS[label]} | {a.mean():.2f} | {b.mean():.2f} | "
                             f"{diff.mean():+.2f} +- {se:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default=",".join(map(str, AT)), help=f"training steps, from {sorted(AT)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print the table of the results present")
    args = p.parse_args(argv)
    if not args.table:
        OUT.mkdir(parents=True, exist_ok=True)
        for steps in map(int, args.budgets.split(",")):
            if steps not in AT:
                p.error(f"no checkpoints recorded for {steps} steps (have {sorted(AT)})")
            run_budget(steps, args.threads)
    print(table())


if __name__ == "__main__":
    main()
