"""A real uvicorn process (``service.server.serve``) and the Python client against it."""
import numpy as np
import pytest

from service.client import Client, ServiceError
from tests.helpers.server import start_server, stop_server

pytestmark = pytest.mark.slow  # a server process


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    client = Client(url, timeout=60)
    try:
        yield client
    finally:
        client.close()
        stop_server(proc)


def test_client_against_a_real_server(server):
    c = server
    assert "grf-32" in [m["id"] for m in c.models()]
    assert c.model("grf-32")["shape"] == [1, 32, 32]
    assert {"dps", "ald", "diffusion_pde", "fast"} <= {m["name"] for m in c.methods()}
    assert len(c.operators()) == 8

    rng = np.random.default_rng(1)
    mask = rng.random((32, 32)) < 0.5  # numpy arrays anywhere in the operator travel as .npy
    y = rng.standard_normal((1, 32, 32)) * mask
    out = c.reconstruct("grf-32", {"kind": "inpainting", "mask": mask}, y,
                        method={"name": "fast", "steps": 6}, num_samples=2, seed=1)
    assert isinstance(out["mean"], np.ndarray) and out["mean"].shape == (1, 32, 32)
    assert out["std"].shape == (1, 32, 32) and out["samples"] is None
    assert out["nfe"] == 6 and out["model"] == "grf-32" and out["metrics"]["data_residual"] < 1e-6
    np.testing.assert_allclose(out["mean"][0][mask], y[0][mask], atol=1e-6)

    jid = c.submit("grf-32", {"kind": "inpainting", "mask": mask}, y, method={"name": "dps", "steps": 10}, seed=1,
                   return_=("mean", "samples"))
    seen = []
    final = c.wait(jid, progress=seen.append, timeout=120)
    assert final["status"] == "succeeded" and c.status(jid)["status"] == "succeeded"
    assert all(e["id"] == jid for e in seen)
    res = c.result(jid)
    assert res["samples"].shape == (1, 1, 32, 32) and res["std"] is None
    assert res["method"]["name"] == "dps"

    with pytest.raises(ServiceError) as e:
        c.reconstruct("no-such-model", {"kind": "identity"}, y)
    assert e.value.status == 404 and e.value.code == "unknown_model"
    with pytest.raises(ServiceError) as e:
        c.result("not-a-job")
    assert e.value.status == 404
    jid = c.submit("grf-32", {"kind": "identity"}, y, method={"name": "fast", "steps": 5})
    c.cancel(jid)  # queued, running or already done: always a 200
