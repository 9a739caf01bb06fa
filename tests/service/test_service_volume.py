"""Stacks and volumes in one request (API.md "Lab data"): [D, C, H, W] in, [D, C, H, W] out."""
import io

import numpy as np
import pytest
from PIL import Image

from guidance.coupling import tv_z
from operators.spec import build_operator
from tests.helpers.service import decode, npy_b64, wait_status

D = 4
RNG = np.random.default_rng(7)
MASKS = (RNG.random((D, 32, 32)) < 0.5).astype(np.float64)
BASE = RNG.standard_normal((1, 32, 32))
VOLUME = np.stack([BASE * (1 + 0.1 * d) + 0.05 * RNG.standard_normal((1, 32, 32)) for d in range(D)])  # [D,1,32,32]


def req(observation, mask=MASKS[0], **kw):
    b = {"model": "grf-32", "operator": {"kind": "inpainting", "mask": {"npy": npy_b64(mask)}},
         "observation": {"npy": npy_b64(observation)}, "noise_sigma": 0.05,
         "method": {"name": "fast", "steps": 6}, "num_samples": 2, "seed": 11,
         "return": ["mean", "std", "samples"]}
    b.update(kw)
    return b


def run(client, body):
    r = client.post("/v1/reconstruct", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status, code, *words):
    assert r.status_code == status, (r.status_code, r.text[:400])
    err = r.json()["error"]
    assert err["code"] == code, err
    for w in words:
        assert w in err["message"], err["message"]


def test_a_stack_is_its_slices_run_alone(make_client):
    client = make_client(slice_chunk=3)  # 8 rows: network calls of 3, 3 and 2 rows
    res = run(client, req(VOLUME * MASKS[0]))
    assert res["mean"]["shape"] == [D, 1, 32, 32] and res["std"]["shape"] == [D, 1, 32, 32]
    assert res["samples"]["shape"] == [2, D, 1, 32, 32]  # [K, D, C, H, W]
    assert res["nfe"] == 6  # one sampler run for the whole stack
    samples = decode(res["samples"])
    for d in range(D):  # slice d gets what a lone job with seed + d gets (float64 model)
        alone = run(client, req(VOLUME[d] * MASKS[0], seed=11 + d))
        np.testing.assert_allclose(samples[:, d], decode(alone["samples"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(decode(res["mean"]), samples.mean(0), atol=1e-6)
    # [D, H, W] for a one-channel model is the same stack
    short = run(client, req((VOLUME * MASKS[0])[:, 0]))
    np.testing.assert_array_equal(decode(short["samples"]), samples)


def test_per_slice_operator_arrays_and_volume_metrics(client):
    res = run(client, req(VOLUME * MASKS[:, None], mask=MASKS))
    samples = decode(res["samples"])
    for d in (0, D - 1):
        alone = run(client, req(VOLUME[d] * MASKS[d], mask=MASKS[d], seed=11 + d))
        np.testing.assert_allclose(samples[:, d], decode(alone["samples"]), rtol=0, atol=1e-6)
    # the metrics are those of the whole volume
    mean = decode(res["mean"]).astype(np.float64)
    y = VOLUME * MASKS[:, None]
    r = np.sqrt(sum(np.sum((y[d] - MASKS[d] * mean[d]) ** 2) for d in range(D)))
    assert res["metrics"]["data_residual"] == pytest.approx(r / np.linalg.norm(y), rel=1e-4)
    assert res["metrics"]["observed_values"] == int(MASKS.sum())
    assert len(res["metrics"]["whitened_misfit"]) == 2


def test_coupling_ties_neighbouring_slices(client):
    y = VOLUME * MASKS[0]
    free = decode(run(client, req(y))["samples"])
    zero = decode(run(client, req(y, coupling={"kind": "tv_z", "weight": 0.0}))["samples"])
    tied = decode(run(client, req(y, coupling={"kind": "tv_z", "weight": 0.5}))["samples"])
    np.testing.assert_array_equal(zero, free)
    import torch
    for k in range(2):
        assert float(tv_z(torch.as_tensor(tied[k]))) < 0.8 * float(tv_z(torch.as_tensor(free[k])))


def test_ct_stack_with_progress_over_the_whole_stack(client):
    op = build_operator({"kind": "ct", "angles": 6}, (1, 32, 32))
    import torch
    y = op.forward(torch.as_tensor(VOLUME)).numpy()  # [D, 1, 6, detectors]
    body = {"model": "grf-32", "operator": {"kind": "ct", "angles": 6}, "observation": {"npy": npy_b64(y)},
            "noise_sigma": 0.1, "method": {"name": "fast", "steps": 5}, "coupling": {"kind": "tv_z", "weight": 0.1}}
    jid = client.post("/v1/jobs", json=body).json()["id"]
    st = wait_status(client, jid)
    assert st["status"] == "succeeded" and st["progress"] == {"step": 5, "total": 5}
    assert client.get(f"/v1/jobs/{jid}/result").json()["mean"]["shape"] == [D, 1, 32, 32]


def test_pictures_montage_and_one_slice(client):
    jid = client.post("/v1/jobs", json=req(VOLUME * MASKS[0])).json()["id"]
    assert wait_status(client, jid)["status"] == "succeeded"
    montage = client.get(f"/v1/jobs/{jid}/result.png")
    one = client.get(f"/v1/jobs/{jid}/result.png?slice=2")
    assert montage.status_code == one.status_code == 200
    assert montage.content.startswith(b"\x89PNG") and one.content.startswith(b"\x89PNG")
    single = client.post("/v1/jobs", json=req(VOLUME[2] * MASKS[0])).json()["id"]
    assert wait_status(client, single)["status"] == "succeeded"
    lone = client.get(f"/v1/jobs/{single}/result.png")
    assert Image.open(io.BytesIO(one.content)).size == Image.open(io.BytesIO(lone.content)).size
    assert Image.open(io.BytesIO(montage.content)).size != Image.open(io.BytesIO(lone.content)).size
    for bad in ("4", "-1", "x", "1.5"):
        assert_error(client.get(f"/v1/jobs/{jid}/result.png?slice={bad}"), 422, "invalid_request", "0 to 3")
    assert_error(client.get(f"/v1/jobs/{single}/result.png?slice=0"), 422, "invalid_request", "no slices")


def test_refusals(make_client):
    from guidance.solve import plan_method
    from service.prepare import job_cost
    from tests.helpers.service import MODELS
    grf = MODELS["grf-32"]
    per_slice = job_cost(plan_method(grf.card, grf.denoiser, "fast", {"steps": 8}), 2, (1, 32, 32))
    client = make_client(max_job_cost=3.5 * per_slice)  # 3 slices fit, 4 do not
    body = req(VOLUME * MASKS[0], method={"name": "fast", "steps": 8})
    assert_error(client.post("/v1/jobs", json=body), 422, "too_costly", "4 slices")
    three = req(VOLUME[:3] * MASKS[0], method={"name": "fast", "steps": 8})
    assert client.post("/v1/jobs", json=three).status_code == 202
    client = make_client()
    assert_error(client.post("/v1/jobs", json=req(VOLUME[0], coupling={"kind": "tv_z", "weight": 1})),
                 422, "invalid_request", "coupling")
    assert_error(client.post("/v1/jobs", json=req(VOLUME, coupling={"kind": "tv_x", "weight": 1})),
                 422, "invalid_request")
    assert_error(client.post("/v1/jobs", json=req(VOLUME, coupling={"kind": "tv_z", "weight": -1})),
                 422, "invalid_request")
    assert_error(client.post("/v1/jobs", json=req(VOLUME[:, :, :16])), 422, "shape_mismatch", "32 x 32")
    two_channels = np.concatenate([VOLUME, VOLUME], axis=1)  # [D, 2, 32, 32] for a one-channel model
    assert_error(client.post("/v1/jobs", json=req(two_channels)), 422, "shape_mismatch", "per slice")
    assert_error(client.post("/v1/jobs", json=req(VOLUME, mask=MASKS[:3])), 422, "invalid_operator")
    ald = req(VOLUME * MASKS[:, None], mask=MASKS, method={"name": "ald", "steps": 4})
    assert_error(client.post("/v1/jobs", json=ald), 422, "invalid_method", "shared")


@pytest.mark.parametrize("shape", [(2, 1, 128, 128), (2, 128, 128)])
def test_a_stack_of_another_size(make_client, shape):
    """Stacks compose with any size (phantom-64 takes images of 64 x 64 and more)."""
    from models.checkpoint import default_checkpoint_dir, load_checkpoint
    client = make_client(models={"phantom-64": load_checkpoint(default_checkpoint_dir() / "phantom-64")})
    y = np.full(shape, 0.4)
    body = {"model": "phantom-64", "operator": {"kind": "identity"}, "observation": {"npy": npy_b64(y)},
            "noise_sigma": 0.1, "method": {"name": "fast", "steps": 2, "cg_iters": 0}}
    res = run(client, body)
    assert res["mean"]["shape"] == [2, 1, 128, 128]
    assert np.isfinite(decode(res["mean"])).all()
