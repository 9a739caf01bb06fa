"""A volume job is durable: ``kill -9`` of a real server while it runs, a restart on the same data
dir, and the job finishes with the result an uninterrupted run gives (grf-32 is float64: bit for
bit). Its stored request holds the [D, ...] observation and the per-slice operator arrays."""
import signal

import httpx
import numpy as np
import pytest

from guidance.solve import solve_batch
from service.prepare import prepare
from service.schemas import make_request_model
from service.settings import Settings
from service.stack import job_items, job_outcomes
from tests.helpers.server import done, start_server, stop_server, wait_for
from tests.helpers.service import MODELS, decode, npy_b64

pytestmark = pytest.mark.slow  # real server processes, killed and restarted

D = 4
RNG = np.random.default_rng(3)
MASKS = (RNG.random((D, 32, 32)) < 0.5).astype(np.float64)
OBS = RNG.standard_normal((D, 1, 32, 32)) * MASKS[:, None]
BODY = {"model": "grf-32", "operator": {"kind": "inpainting", "mask": {"npy": npy_b64(MASKS)}},
        "observation": {"npy": npy_b64(OBS)}, "noise_sigma": 0.05, "num_samples": 1, "seed": 4,
        "method": {"name": "dps", "steps": 2500}, "coupling": {"kind": "tv_z", "weight": 0.2},
        "return": ["mean", "samples"]}


def uninterrupted() -> np.ndarray:
    """The samples ``[K, D, C, H, W]`` of the job run once, in this process, as the worker runs it."""
    from operators.spec import OPERATORS
    from guidance.registry import METHODS
    settings = Settings()
    p = prepare(BODY, make_request_model(OPERATORS, METHODS), MODELS, settings)
    run = solve_batch(p.model, p.plan, job_items(p), noise_sigma=p.noise_sigma, chunk=settings.slice_chunk)
    return job_outcomes([p], run.items)[0].samples.float().numpy()


def test_a_volume_job_survives_kill_9(tmp_path):
    env = {"RECONSERVE_DATA_DIR": tmp_path / "data"}
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/jobs", json=BODY)
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            wait_for(http, jid, lambda st: st["status"] == "running" and st["progress"]["step"] > 100)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            st = wait_for(http, jid, done, timeout=300)
            assert st["status"] == "succeeded", st
            assert st["progress"]["total"] == 2500
            res = http.get(f"/v1/jobs/{jid}/result").json()
            assert res["mean"]["shape"] == [D, 1, 32, 32]
            np.testing.assert_array_equal(decode(res["samples"]), uninterrupted())
            assert http.get(f"/v1/jobs/{jid}/result.png?slice=3").status_code == 200
    finally:
        stop_server(proc)
