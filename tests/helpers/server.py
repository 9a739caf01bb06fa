"""A real ``reconserve serve`` process on a free loopback port, for the tests that need one (they
are marked ``slow``), and jobs submitted to it over HTTP, checked against an uninterrupted
library run."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from guidance.solve import solve
from operators.spec import build_operator
from service.client import Client
from tests.helpers.polling import wait_until
from tests.helpers.service import MASK, MODELS, OBS, body

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_overrides: dict | None = None, ready_timeout: float = 120.0, serve_args: tuple = ()):
    """``reconserve serve`` (with ``serve_args``, e.g. ``--ray``) in a subprocess on a free
    loopback port, waited for until ``/readyz`` answers 200 -> ``(proc, url)``. The job store lives
    in a fresh temporary ``RECONSERVE_DATA_DIR`` unless ``env_overrides`` names one; the server's
    output goes to ``proc.log_path`` (a pipe nobody reads would fill and stall it). Stop it with
    ``stop_server``."""
    tmp = Path(tempfile.mkdtemp(prefix="reconserve-test-"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECONSERVE_BATCH_WINDOW_MS="5",
               RECONSERVE_TORCH_THREADS="1", RECONSERVE_DATA_DIR=str(tmp / "data"))
    env.update({k: str(v) for k, v in (env_overrides or {}).items()})
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), *serve_args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path, proc.tmp_dir = log_path, tmp
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, ready_timeout)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def _wait_ready(proc, url: str, timeout: float) -> None:
    """Until ``/readyz`` answers 200; fails at once if the process exits, else after ``timeout`` s."""
    with Client(url, timeout=5) as client:
        end = time.monotonic() + timeout
        while not client.ready():
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + server_log(proc)[-3000:])
            if time.monotonic() > end:
                raise AssertionError(f"server not ready within {timeout} s:\n" + server_log(proc)[-3000:])
            time.sleep(0.25)


def server_log(proc) -> str:
    try:
        return proc.log_path.read_text(errors="replace")
    except OSError:
        return ""


def stop_server(proc, timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` s; removes the temporary data dir. -> exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(proc.tmp_dir, ignore_errors=True)
    return proc.returncode


# ----------------------------------------------------------------------------- jobs over HTTP
#: A job that runs a while (2 samples): 0.7-2.5 s here, by how busy the machine is.
LONG = {"name": "dps", "steps": 2500}


def submit(http, **kw) -> str:
    """``POST /v1/jobs`` of ``body(**kw)`` asking for the mean and the samples -> the job's id."""
    r = http.post("/v1/jobs", json=body(**{"return": ["mean", "samples"]}, **kw))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_for(http, job_id, pred, timeout=120.0) -> dict:
    """Polls ``GET /v1/jobs/{job_id}`` until ``pred(status body)`` holds -> that body."""
    return wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json(), pred, timeout=timeout,
                      what=f"job {job_id}'s awaited state")


def done(st) -> bool:
    return st["status"] in ("succeeded", "failed", "cancelled")


def solo(seed: int, method: dict, num_samples: int = 2) -> np.ndarray:
    """The samples an uninterrupted library run of ``body(seed=seed, method=method)`` gives."""
    params = {k: v for k, v in method.items() if k != "name"}
    op = build_operator({"kind": "inpainting", "mask": MASK}, (1, 32, 32))
    return solve(MODELS["grf-32"], op, OBS * MASK, method=method["name"], params=params,
                 num_samples=num_samples, seed=seed).samples
