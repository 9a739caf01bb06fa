"""Helpers of the service tests: the analytic grf-32 model (exact and fast), a slowed-down copy of it for
jobs that must stay running a while, and a tiny 2-channel "PDE" model (standard Gaussian
prior, Darcy card) for the PDE paths. No checkpoints are needed."""
import base64
import io
import time

import numpy as np
import torch

from models.checkpoint import LoadedModel, builtin_models
from models.denoiser import Denoiser


class SlowDenoiser(Denoiser):
    """grf-32's exact denoiser, sleeping ``delay`` seconds per call (keeps jobs running)."""

    def __init__(self, inner, delay=0.02):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.shape, self.sigma_min, self.sigma_max = inner.shape, inner.sigma_min, inner.sigma_max
        self.sigma_data = inner.sigma_data

    def forward(self, x, sigma):
        time.sleep(self.delay)
        return self.inner(x, sigma)


class WhiteDenoiser(Denoiser):
    """Exact denoiser of a standard normal prior: ``D(x, sigma) = x / (1 + sigma^2)``."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.sigma_min, self.sigma_max, self.sigma_data = tuple(shape), 0.002, 80.0, 1.0

    def forward(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return x / (1 + s ** 2)


def make_models():
    models = dict(builtin_models())
    grf = models["grf-32"]
    slow_card = dict(grf.card, id="slow-32", description="grf-32, slowed down for tests")
    models["slow-32"] = LoadedModel(slow_card, SlowDenoiser(grf.denoiser))
    pde_card = {
        "id": "toy-darcy-16", "kind": "pde", "shape": [2, 16, 16], "channels": ["a", "u"],
        "pde": {"kind": "darcy", "f": 1.0, "h": 1 / 15}, "prior": None,
        "value_range": {"a": [3.0, 12.0]}, "description": "test model", "training": None,
        "normalization": {"shift": [7.5, 0.005], "scale": [9.0, 0.007]},
        "methods": [{"name": "fast", "steps": 6}], "sigma_min": 0.002, "sigma_max": 80.0,
    }
    models["toy-darcy-16"] = LoadedModel(pde_card, WhiteDenoiser((2, 16, 16)))
    return models


MODELS = make_models()


def npy_b64(a) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def decode(enc) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(enc["npy"])), allow_pickle=False)


RNG = np.random.default_rng(0)
MASK = (RNG.random((32, 32)) < 0.5).astype(np.float64)
OBS = RNG.standard_normal((1, 32, 32))


def body(**kw):
    """A small valid request (grf-32, inpainting, fast, 8 steps) with overrides."""
    b = {"model": "grf-32", "operator": {"kind": "inpainting", "mask": {"npy": npy_b64(MASK)}},
         "observation": {"npy": npy_b64(OBS)}, "noise_sigma": 0.0,
         "method": {"name": "fast", "steps": 8}, "num_samples": 2, "seed": 3}
    b.update(kw)
    return b


def wait_status(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = client.get(f"/v1/jobs/{job_id}").json()
        if st["status"] in statuses:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {st['status']} after {timeout} s")


# ----------------------------------------------------------------------------- a real server process
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_overrides: dict | None = None, ready_timeout: float = 120.0, serve_args: tuple = ()):
    """``reconserve serve`` (with ``serve_args``, e.g. ``--ray``) in a subprocess on a free
    loopback port, waited for until ``/readyz`` answers 200 -> ``(proc, url)``. The job store lives in a fresh temporary
    ``RECONSERVE_DATA_DIR`` unless ``env_overrides`` names one; the server's output goes to
    ``proc.log_path`` (a pipe nobody reads would fill and stall it). Stop it with ``stop_server``."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from service.client import Client

    root = Path(__file__).resolve().parents[2]
    tmp = Path(tempfile.mkdtemp(prefix="reconserve-test-"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(root), RECONSERVE_BATCH_WINDOW_MS="5",
               RECONSERVE_TORCH_THREADS="1", RECONSERVE_DATA_DIR=str(tmp / "data"))
    env.update({k: str(v) for k, v in (env_overrides or {}).items()})
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), *serve_args],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path, proc.tmp_dir = log_path, tmp
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, timeout=5) as client:
            end = time.monotonic() + ready_timeout
            while not client.ready():
                if proc.poll() is not None:
                    raise AssertionError("server exited:\n" + server_log(proc)[-3000:])
                if time.monotonic() > end:
                    raise AssertionError(f"server not ready within {ready_timeout} s:\n" + server_log(proc)[-3000:])
                time.sleep(0.25)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def server_log(proc) -> str:
    try:
        return proc.log_path.read_text(errors="replace")
    except OSError:
        return ""


def stop_server(proc, timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` s; removes the temporary data dir. -> exit status."""
    import shutil
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(proc.tmp_dir, ignore_errors=True)
    return proc.returncode
