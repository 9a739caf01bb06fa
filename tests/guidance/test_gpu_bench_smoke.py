"""bench/gpu.py and its one-command device script (bench/gpu_device.sh) run on the CPU in their
smoke modes, so the script a lent GPU machine runs is known to work before it gets there."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    res = load_bench().main(["--smoke", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["smoke"] and saved["env"]["device"] == "cpu" and saved["env"]["state_dtype"] == "float64"
    (m,) = res["models"]
    assert m["id"] == "phantom-64" and m["shape"] == [1, 64, 64]
    net = [r for r in m["network"] if "s" in r]
    assert {(r["batch"], r["mode"]) for r in net} == {(b, k) for b in (1, 2) for k in ("forward", "forward_backward")}
    assert all(r["s"] > 0 for r in net)
    assert {r["method"] for r in m["sampler"]} == {"fast", "dps", "ald", "diffusion_pde"}
    for r in m["sampler"]:
        assert "error" not in r, r
        assert r["finite"] and r["nfe"] > 0 and r["overhead"] > 0 and r["sample_dtype"] == "float64"
    b = m["batching"]
    assert "error" not in b, b
    assert b["jobs"] == 2 and b["gain"] > 0 and b["max_abs_diff_batched_vs_alone"] < 1e-3


def test_gpu_bench_skips_adm_without_deepinv(monkeypatch):
    mod = load_bench()
    monkeypatch.setattr(mod, "deepinv_status", lambda: (False, "deepinv does not import here (test)"))
    res = mod.main(["--smoke", "--device", "cpu", "--models", "adm"])
    assert res["models"] == [{"id": "adm", "deepinv": "deepinv does not import here (test)",
                              "skipped": "deepinv does not import here (test)"}]


@pytest.mark.slow
def test_gpu_device_script_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_device.sh"), "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "gpu.json").read_text())["smoke"] is True
    log = (tmp_path / "cuda_tests.log").read_text()
    assert "skipped" in log or "passed" in log, log[-2000:]
