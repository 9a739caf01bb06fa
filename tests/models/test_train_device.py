"""The one-command GPU training script (bench/train_device.sh) in its CPU smoke mode: it resumes the
committed checkpoints, returns files the device tool brings back, and what it returns resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import data as D
from models.trainer import Trainer, augment_mode

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("darcy-64", "phantom-64")
FILES = ("weights.safetensors", "resume.safetensors", "card.json")
MIB16 = 16 * 2 ** 20  # the device tool's limit per file


def _state(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def _copy_checkpoint(model: str, dst: Path) -> None:
    """The three files only (a trainer rewriting checkpoints/ leaves short-lived .tmp files beside them)."""
    dst.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(ROOT / "checkpoints" / model / name, dst / name)


def _resume_one_step(folder: Path) -> None:
    """Load a returned resume state into a fresh CPU trainer and train one more step."""
    st = _state(folder / "resume.safetensors")
    card = json.loads((folder / "card.json").read_text())
    tr = Trainer(st["config"], card["shape"], torch.device("cpu"))
    tr.unpack(load_file(str(folder / "resume.safetensors")))
    tr.load_scalars(st)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    x = torch.randn(4, *card["shape"]) * 0.5
    loss = tr.train_step(x, augment_mode(st["config"], st["kind"]))
    assert np.isfinite(loss) and tr.step == st["step"] + 1
    assert any(not torch.equal(before[k], v) for k, v in tr.net.state_dict().items())
    packed = tr.pack()
    assert packed["rng.cpu"].dtype == torch.uint8 and all(v.device.type == "cpu" for v in packed.values())


@pytest.mark.slow
def test_train_device_smoke(tmp_path):
    dest = tmp_path / "ck"  # a copy of the checkpoints before the run: the fetch target
    for m in MODELS:
        _copy_checkpoint(m, dest / m)
    before = {m: _state(dest / m / "resume.safetensors")["step"] for m in MODELS}
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "bench" / "train_device.sh"), "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]

    # what the device tool would bring back: at most 8 files, 16 MiB each, 2 folders deep
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.relative_to(out).parts) <= 3 for f in files), files
    assert all(f.stat().st_size < MIB16 for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "train_device.log").exists()
    for m in MODELS:
        for name in FILES:
            assert (out / m / name).is_file()
        s = summary[m]
        assert s["status"] == "trained" and s["start_step"] >= before[m] and s["batch"] == 4
        assert s["end_step"] == s["start_step"] + 3 and s["verify"]["ok"]
        card = json.loads((out / m / "card.json").read_text())
        st = _state(out / m / "resume.safetensors")
        assert card["training"]["steps"] == st["step"] == s["end_step"]
        assert card["id"] == m and card["training"]["batch"] == 4
        _resume_one_step(out / m)

    # bench/train_device_fetch.sh copies them into a checkpoints folder (here a copy), once
    fetch = ["bash", str(ROOT / "bench" / "train_device_fetch.sh"), "--dest", str(dest),
             "--runs-dir", str(tmp_path / "runs"), str(out)]
    p = subprocess.run(fetch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for m in MODELS:
        for name in FILES:
            assert (dest / m / name).read_bytes() == (out / m / name).read_bytes()
    p = subprocess.run([*fetch, "--dry-run", "phantom-64"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "NOT fetched: phantom-64" in p.stderr  # the destination is no longer behind


def test_parallel_data_equals_models_data():
    from models.train_device import darcy_parallel, phantom_parallel

    ref, _ = D.generate("darcy", 6, 16, 0)
    assert np.array_equal(darcy_parallel(6, 16, 0, workers=2), ref)
    assert np.array_equal(darcy_parallel(6, 16, 0, workers=1), ref)
    ref, _ = D.generate("phantom", 300, 16, 0)  # two chunks of models.data's 256
    assert np.array_equal(phantom_parallel(300, 16, 0, workers=2), ref)
    assert np.array_equal(phantom_parallel(5, 16, 0, workers=1), ref[:5])


def test_files_over_the_transfer_limit_travel_gzipped(tmp_path, monkeypatch):
    import models.train_device as TD

    work, out = tmp_path / "work", tmp_path / "out"
    _copy_checkpoint("phantom-64", work)
    monkeypatch.setattr(TD, "TRANSFER_LIMIT", 2 ** 20)
    sizes = TD.export(work, out / "phantom-64")
    assert set(sizes) == {"resume.safetensors.gz", "weights.safetensors.gz", "card.json"}
    back = tmp_path / "back"
    TD.copy_state(out / "phantom-64", back)  # what the fetch (and a resume from OUT) reads
    for name in FILES:
        assert (back / name).read_bytes() == (work / name).read_bytes()
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "bench" / "train_device_fetch.sh"), "--dry-run", "--dest",
                        str(tmp_path / "empty"), "--runs-dir", str(tmp_path / "runs"), str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "phantom-64: step None -> " in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_train_device_smoke_keeps_the_flow_objective(tmp_path):
    """Any committed prior trains on the device, the flow-matching one included: its state resumes as flow
    (the trainer refuses to switch objectives on resume) and the returned card still says so."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "bench" / "train_device.sh"), "--smoke", "phantom-flow-64"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())["phantom-flow-64"]
    assert s["status"] == "trained" and s["end_step"] == s["start_step"] + 3 and s["verify"]["ok"]
    card = json.loads((out / "phantom-flow-64" / "card.json").read_text())
    st = _state(out / "phantom-flow-64" / "resume.safetensors")
    assert card["parameterization"]["kind"] == "flow" and st["config"]["objective"] == "flow"
    assert card["training"]["steps"] == st["step"] == s["end_step"]


def test_training_imports_nothing_of_the_service():
    """Training on a bare machine imports the project's own code, no stubs: the trainer, the data
    generators and the PDE solvers they call leave pydantic, deepinv and fastapi unimported."""
    code = ("import sys\n"
            "import models.train_device, models.train\n"
            "from models import data as D\n"
            "for kind in ('darcy', 'poisson', 'helmholtz'):\n"
            "    arr, _ = D.generate(kind, 2, 8, 0)\n"
            "    assert arr[:, 1, 1:-1, 1:-1].std() > 0  # a solve ran\n"
            "assert 'operators.pde_solvers' in sys.modules\n"
            "print(sorted(m for m in ('pydantic', 'deepinv', 'fastapi') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
