"""The light client (``clients/python``, distribution ``reconserve-client``) installs into a fresh
virtual environment with pip, where torch (and the server's packages) cannot be imported, and
works there against a real server process: reconstruct (arrays, and a TIFF file in and out),
submit, wait with progress, result, cancel, list_jobs, and 4xx answers raised as its
``ServiceError`` with status, code and message. What the client decoded is checked against what
the server answers over plain HTTP.

pip takes numpy and httpx from the package index (pinned by ``requirements.lock``), never from the
project's environment, so nothing the server installs is visible in that venv.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from service.codecs import from_encoded
from tests.helpers.server import start_server, stop_server

pytestmark = pytest.mark.slow  # a venv, pip and a server process

ROOT = Path(__file__).resolve().parents[2]

#: Run by the fresh venv's python: argv = server URL, a folder holding obs.tif (and the outputs).
#: Prints one JSON report; arrays go to .npy files beside obs.tif.
SCRIPT = r'''
import importlib.util, json, sys
from pathlib import Path
import numpy as np
import reconserve_client
from reconserve_client import Client, ServiceError

url, work = sys.argv[1], Path(sys.argv[2])
report = {"client": reconserve_client.__file__,
          "found": {m: importlib.util.find_spec(m) is not None for m in ("torch", "service", "models")}}
try:
    import torch  # noqa: F401
    report["import_torch"] = "imported"
except ImportError as e:
    report["import_torch"] = type(e).__name__

def error_of(call):
    try:
        call()
    except ServiceError as e:
        return {"type": type(e).__name__, "status": e.status, "code": e.code, "message": e.message}
    return None

rng = np.random.default_rng(1)
mask = rng.random((32, 32)) < 0.5
y = rng.standard_normal((1, 32, 32)) * mask
with Client(url, timeout=120) as c:
    out = c.reconstruct("grf-32", {"kind": "inpainting", "mask": mask}, y,
                        method={"name": "fast", "steps": 6}, num_samples=2, seed=1)
    np.save(work / "reconstruct_mean.npy", out["mean"])
    report["reconstruct"] = {"id": out["id"], "nfe": out["nfe"], "std": list(out["std"].shape),
                             "samples": out["samples"]}
    lab = c.reconstruct("grf-32", {"kind": "identity"}, str(work / "obs.tif"),
                        method={"name": "fast", "steps": 4}, out=work / "recon.tif")
    report["lab"] = {"id": lab["id"], "file_is_tiff": lab["file"][:4] in (b"II*\x00", b"MM\x00*")}

    job = c.submit("grf-32", {"kind": "inpainting", "mask": mask}, y, method={"name": "dps", "steps": 10},
                   seed=1, return_=("mean", "samples"))
    seen = []
    final = c.wait(job, progress=seen.append, timeout=120)
    res = c.result(job)
    np.save(work / "job_samples.npy", res["samples"])
    report["job"] = {"id": job, "final": final["status"], "events": seen, "std": res["std"]}

    long = c.submit("grf-32", {"kind": "inpainting", "mask": mask}, y, method={"name": "dps", "steps": 5000},
                    num_samples=4)  # seconds of work: cancelled while queued or running
    report["cancel"] = {"id": long, "answer": c.cancel(long)["id"], "final": c.wait(long, timeout=60)["status"]}
    page = c.list_jobs(limit=2)
    report["list"] = {"ids": [j["id"] for j in page["jobs"]], "next": page["next_page_token"],
                      "cancelled": [j["id"] for j in c.list_jobs(status="cancelled")["jobs"]],
                      "statuses": {j["id"]: j["status"] for j in c.list_jobs()["jobs"]}}
    report["errors"] = {
        "unknown_model": error_of(lambda: c.reconstruct("no-such-model", {"kind": "identity"}, y)),
        "cancelled_result": error_of(lambda: c.result(long)),
        "unknown_job": error_of(lambda: c.status("not-a-job")),
    }
print(json.dumps(report))
'''


def _run(cmd, cwd, env=None, timeout=240) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _clean_env() -> dict:
    """This environment without PYTHON* variables (no PYTHONPATH into the checkout)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OMP_NUM_THREADS": "1"}


def _light_venv(folder: Path) -> Path:
    """A fresh venv with pip, and ``pip install ./clients/python`` in it -> its python. pip builds
    in the source folder (``build/``, ``*.egg-info``): a copy of it, so the checkout stays clean."""
    env_dir = folder / "venv"
    venv.create(env_dir, with_pip=True)
    shutil.copytree(ROOT / "clients" / "python", folder / "clients" / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"), "./clients/python"],
         cwd=folder, env=_clean_env())
    return py


@pytest.fixture(scope="module")
def light_venv_and_server(tmp_path_factory):
    """-> ``(the light venv's python, a server's URL)``: the server starts while pip installs."""
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(start_server)
        try:
            py = _light_venv(tmp_path_factory.mktemp("light"))
        except BaseException:
            stop_server(started.result()[0])
            raise
        proc, url = started.result()
    try:
        yield py, url
    finally:
        stop_server(proc)


def test_light_client_without_torch_against_a_real_server(light_venv_and_server, tmp_path):
    light_venv, server = light_venv_and_server
    obs = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    tifffile.imwrite(tmp_path / "obs.tif", obs)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    report = json.loads(_run([str(light_venv), str(script), server, str(tmp_path)], cwd=tmp_path, env=_clean_env()))

    # installed in that venv, where neither torch nor the server's packages exist
    assert Path(report["client"]).is_relative_to(light_venv.parent.parent), report["client"]
    assert report["found"] == {"torch": False, "service": False, "models": False}
    assert report["import_torch"] in ("ImportError", "ModuleNotFoundError")

    with httpx.Client(base_url=server, timeout=60) as http:
        def api_result(job_id, field):
            return from_encoded(http.get(f"/v1/jobs/{job_id}/result").json()[field])

        rec = report["reconstruct"]
        assert rec["nfe"] == 6 and rec["std"] == [1, 32, 32] and rec["samples"] is None
        mean = np.load(tmp_path / "reconstruct_mean.npy")
        np.testing.assert_array_equal(mean, api_result(rec["id"], "mean"))
        rng = np.random.default_rng(1)  # the script's mask and observation: the mean fits the data
        mask = rng.random((32, 32)) < 0.5
        y = rng.standard_normal((1, 32, 32)) * mask
        np.testing.assert_allclose(mean[0][mask], y[0][mask], atol=1e-6)

        assert report["lab"]["file_is_tiff"]  # the TIFF sent as bytes, the result asked for as TIFF
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "recon.tif"),  # [1, 32, 32], as the mean
                                      api_result(report["lab"]["id"], "mean").astype(np.float32))

        job = report["job"]
        assert job["final"] == "succeeded" and job["std"] is None
        steps = [e["progress"]["step"] for e in job["events"]]
        assert steps and steps == sorted(steps) and all(e["id"] == job["id"] for e in job["events"])
        np.testing.assert_array_equal(np.load(tmp_path / "job_samples.npy"), api_result(job["id"], "samples"))

    cancel = report["cancel"]
    assert cancel["answer"] == cancel["id"] and cancel["final"] == "cancelled"
    assert report["list"]["ids"] == [cancel["id"], job["id"]] and report["list"]["next"]  # newest first, paged
    assert report["list"]["cancelled"] == [cancel["id"]], report["list"]

    errors = report["errors"]
    assert errors["unknown_model"]["type"] == "ServiceError"
    assert errors["unknown_model"]["status"] == 404 and errors["unknown_model"]["code"] == "unknown_model"
    assert "grf-32" in errors["unknown_model"]["message"]  # the API's wording: which ids there are
    assert errors["cancelled_result"]["status"] == 409 and errors["cancelled_result"]["code"] == "cancelled"
    assert errors["unknown_job"]["status"] == 404 and errors["unknown_job"]["message"]
