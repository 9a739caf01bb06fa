"""The in-process service tests' models and requests: the analytic grf-32 model (exact and fast), a
slowed-down copy of it for jobs that must stay running a while, and a tiny 2-channel "PDE" model
(standard Gaussian prior, Darcy card) for the PDE paths; a small valid request body, the npy
codec, waits on a job's status, and a Prometheus metric's value. No checkpoints are needed."""
import base64
import io
import re
import time

import numpy as np
import torch

from models.checkpoint import LoadedModel, builtin_models
from models.denoiser import Denoiser
from tests.helpers.polling import wait_until


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
    """Polls ``GET /v1/jobs/{job_id}`` until its status is one of ``statuses`` -> that status body."""
    return wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json(), lambda st: st["status"] in statuses,
                      timeout=timeout, what=f"job {job_id} in {statuses}")


def slow(steps=200, **kw):
    """A job on the slowed-down grf copy (20 ms per step): stays running for a while."""
    return body(model="slow-32", method={"name": "fast", "steps": steps}, num_samples=1, **kw)


def wait_running(client, job_id, min_step=1, timeout=20.0):
    """Until the job runs at step ``min_step`` or later; fails at once if it ends first."""
    def running(st):
        assert st["status"] in ("queued", "running"), st
        return st["status"] == "running" and st["progress"]["step"] >= min_step
    return wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json(), running, timeout=timeout,
                      interval=0.02, what=f"job {job_id} running at step {min_step}")


def metric(client, name, **labels) -> float:
    """A sample's value in ``GET /metrics`` (0.0 where it is absent)."""
    text = client.get("/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(sel) + r"\}" if sel else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0
