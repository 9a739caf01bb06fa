"""The service on CUDA (``Settings(device="cuda")``, i.e. ``RECONSERVE_DEVICE=cuda``): the worker
runs every method on the GPU, batches jobs there, and answers what the library answers on the
same device. Skipped without a GPU (``tests/conftest.py``); ``bash bench/gpu_device.sh`` runs it
on a lent GPU machine."""
import numpy as np
import pytest
import torch

from guidance.solve import solve
from models.checkpoint import LoadedModel, default_checkpoint_dir, load_checkpoint
from operators.spec import build_operator
from tests.helpers.service import MASK, OBS, body, decode, make_models, npy_b64, wait_status

pytestmark = pytest.mark.cuda

DEV = "cuda"
METHODS = {"fast": {"name": "fast", "steps": 8}, "dps": {"name": "dps", "steps": 8},
           "ald": {"name": "ald", "steps": 6, "final_corrector_steps": 4},
           "diffusion_pde": {"name": "diffusion_pde", "steps": 6}}


@pytest.fixture(scope="module")
def cuda_models():
    """The test models (grf-32, slow-32, toy-darcy-16) and phantom-64, all on the GPU."""
    models = {k: LoadedModel(m.card, m.denoiser.to(DEV)) for k, m in make_models().items()}
    ph = load_checkpoint(default_checkpoint_dir() / "phantom-64", DEV)
    models[ph.id] = ph
    return models


@pytest.fixture
def gpu_client(make_client, cuda_models):
    return make_client(models=cuda_models, device=DEV)


def test_ready_reports_the_device(gpu_client):
    assert gpu_client.get("/readyz").json()["device"] == DEV


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reconstruct_every_method_on_cuda(gpu_client, cuda_models, method):
    noise = 0.05
    r = gpu_client.post("/v1/reconstruct", json=body(method=METHODS[method], noise_sigma=noise,
                                                     **{"return": ["mean", "samples"]}))
    assert r.status_code == 200, r.text
    res = r.json()
    samples = decode(res["samples"])
    assert samples.shape == (2, 1, 32, 32) and np.isfinite(samples).all()
    assert np.isfinite(res["metrics"]["data_residual"])
    # what the library gives on the same device (unobserved entries ignored)
    params = {k: v for k, v in METHODS[method].items() if k != "name"}
    sol = solve(cuda_models["grf-32"], build_operator({"kind": "inpainting", "mask": MASK}, (1, 32, 32)),
                OBS * MASK, noise_sigma=noise, method=method, params=params, num_samples=2, seed=3, device=DEV)
    np.testing.assert_allclose(samples, sol.samples, rtol=0, atol=1e-5)


def test_noiseless_inpainting_is_data_consistent_in_float32(gpu_client):
    res = gpu_client.post("/v1/reconstruct", json=body()).json()
    assert res["metrics"]["data_residual"] < 1e-5


def test_phantom_unet_job_on_cuda(gpu_client):
    mask = (np.random.default_rng(0).random((64, 64)) < 0.3).astype(np.float64)
    obs = np.random.default_rng(1).random((1, 64, 64)) * mask
    r = gpu_client.post("/v1/reconstruct", json=body(
        model="phantom-64", operator={"kind": "inpainting", "mask": {"npy": npy_b64(mask)}},
        observation={"npy": npy_b64(obs)}, noise_sigma=0.02, method={"name": "fast", "steps": 10}))
    assert r.status_code == 200, r.text
    mean = decode(r.json()["mean"])
    assert mean.shape == (1, 64, 64) and np.isfinite(mean).all()


def test_batched_jobs_on_cuda_match_solo_runs(make_client, cuda_models):
    c = make_client(models=cuda_models, device=DEV)
    rng = np.random.default_rng(7)
    jobs = [body(seed=1, **{"return": ["samples"]}),
            body(seed=2, num_samples=3, observation={"npy": npy_b64(-OBS)}, **{"return": ["samples"]}),
            body(seed=3, operator={"kind": "inpainting", "mask": {"npy": npy_b64((rng.random((32, 32)) < 0.4)
                                                                                 .astype(float))}},
                 **{"return": ["samples"]})]
    c.manager.pause()
    ids = [c.post("/v1/jobs", json=j).json()["id"] for j in jobs]
    c.manager.resume()
    results = []
    for jid in ids:
        assert wait_status(c, jid)["status"] == "succeeded"
        results.append(c.get(f"/v1/jobs/{jid}/result").json())
    assert [r["batched_with"] for r in results] == [3, 3, 3]
    solo = make_client(models=cuda_models, device=DEV, max_batch=1)
    for job, res in zip(jobs, results):
        alone = solo.post("/v1/reconstruct", json=job).json()
        assert alone["batched_with"] == 1
        np.testing.assert_allclose(decode(res["samples"]), decode(alone["samples"]), rtol=0, atol=1e-4)


def test_a_diverging_job_on_cuda_fails_alone(make_client, cuda_models):
    c = make_client(models=cuda_models, device=DEV)
    c.manager.pause()
    bad = c.post("/v1/jobs", json=body(observation={"npy": npy_b64(np.full((1, 32, 32), 1e306))})).json()["id"]
    good = c.post("/v1/jobs", json=body(seed=4)).json()["id"]
    c.manager.resume()
    assert wait_status(c, bad)["error"]["code"] == "diverged"
    assert wait_status(c, good)["status"] == "succeeded"


def test_gpu_memory_metric(gpu_client):
    gpu_client.post("/v1/reconstruct", json=body())
    text = gpu_client.get("/metrics").text
    assert "reconserve_gpu_memory_bytes" in text
    assert torch.cuda.memory_allocated() > 0
