"""Open Inference Protocol (KServe v2) beside /v1 (docs/API.md "Open Inference Protocol").

In-process (TestClient): health, metadata and readiness; an infer answers what
``POST /v1/reconstruct`` answers for the same request, through the same queue (it batches with
/v1 jobs, and its job is a /v1 job in the store); the binary tensor extension both ways; every
bad request answers ``{"error": "<message>"}`` with the status /v1 gives.

Against a real server (slow): Triton's own client, ``tritonclient[http]``, reads metadata and
readiness and runs infer on grf-32 and phantom-64 (64 x 64 as JSON; 256 x 256, an any-size image,
with the binary extension), each equal to /v1's result for the same seed.
"""
import json
import threading

import numpy as np
import pytest

from service.codecs import from_encoded
from tests.helpers.polling import wait_until
from tests.helpers.service import MASK, MODELS, OBS, metric, npy_b64

FAST = {"name": "fast", "steps": 8}


def infer_body(obs, datatype="FP64", request_id=None, **params) -> dict:
    """An infer request: ``obs`` as JSON data, the /v1 fields as parameters (JSON text or numbers)."""
    params = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in params.items()}
    req = {"inputs": [{"name": "observation", "datatype": datatype, "shape": list(obs.shape),
                       "data": np.asarray(obs).ravel().tolist()}], "parameters": params}
    if request_id is not None:
        req["id"] = request_id
    return req


def v1_body(model, obs, **fields) -> dict:
    return {"model": model, "observation": {"npy": npy_b64(obs)}, **fields}


def outputs_of(r) -> dict:
    """The JSON outputs of an infer response -> name: array (FP32)."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


INPAINT = {"kind": "inpainting", "mask": MASK.tolist()}


# ----------------------------------------------------------------------------- in-process
def test_health_metadata_and_readiness(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/grf-32").json()
    assert meta["name"] == "grf-32"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("observation", "FP32", [1, 32, 32])]
    assert meta["inputs"][0]["parameters"]["datatypes"] == "FP32,FP64"
    assert [t["name"] for t in meta["outputs"]] == ["mean", "std"]
    params = meta["parameters"]
    assert params["operator"].startswith("required")
    assert params["num_samples"].startswith("default 1") and params["seed"].startswith("default 0")
    assert params["noise_sigma"].startswith("default 0.0")
    assert f"({MODELS['grf-32'].card['methods'][0]['name']})" in params["method"]  # the card's default method
    assert "model" not in params and "observation" not in params
    assert client.get("/v2/models/grf-32/ready").json() == {"name": "grf-32", "ready": True}
    r = client.get("/v2/models/nope/ready")
    assert r.status_code == 404 and set(r.json()) == {"error"} and "grf-32" in r.json()["error"]


def test_any_size_model_metadata_has_free_dims(make_client):
    from models.checkpoint import load_models
    c = make_client(models=load_models())
    meta = c.get("/v2/models/phantom-64").json()
    assert meta["inputs"][0]["shape"] == [1, -1, -1] and meta["outputs"][0]["shape"] == [1, -1, -1]
    assert c.get("/v2/models/darcy-64").json()["inputs"][0]["shape"] == [2, 64, 64]  # native grid only


def test_infer_equals_v1_reconstruct(client):
    fields = dict(operator=INPAINT, method=FAST, num_samples=2, seed=3, noise_sigma=0.05)
    r = client.post("/v2/models/grf-32/infer", json=infer_body(OBS, request_id="req-1", **fields))
    assert r.status_code == 200, r.text
    doc, out = r.json(), outputs_of(r)
    v1 = client.post("/v1/reconstruct", json=v1_body("grf-32", OBS, **fields)).json()
    np.testing.assert_array_equal(out["mean"], from_encoded(v1["mean"]))
    np.testing.assert_array_equal(out["std"], from_encoded(v1["std"]))
    assert doc["model_name"] == "grf-32" and doc["id"] == "req-1"
    p = doc["parameters"]
    assert p["seed"] == 3 and p["num_samples"] == 2 and p["nfe"] == v1["nfe"]
    assert json.loads(p["method"]) == v1["method"] and json.loads(p["metrics"]) == v1["metrics"]
    # the infer was a /v1 job: durable in the store, its result readable there
    st = client.get(f"/v1/jobs/{p['job_id']}").json()
    assert st["status"] == "succeeded" and st["model"] == "grf-32"
    stored = client.get(f"/v1/jobs/{p['job_id']}/result").json()
    np.testing.assert_array_equal(from_encoded(stored["mean"]), out["mean"])
    # one sample: mean only; a bare method name; FP32 input read as the float32 array it is
    obs32 = OBS.astype(np.float32)
    r = client.post("/v2/models/grf-32/infer", json=infer_body(obs32, "FP32", operator={"kind": "identity"},
                                                                method="fast", seed=1))
    v1 = client.post("/v1/reconstruct", json=v1_body("grf-32", obs32, operator={"kind": "identity"},
                                                    method={"name": "fast"}, seed=1)).json()
    assert list(outputs_of(r)) == ["mean"]
    np.testing.assert_array_equal(outputs_of(r)["mean"], from_encoded(v1["mean"]))


def binary_request(obs: np.ndarray, params: dict, outputs: list) -> tuple[bytes, dict]:
    """A body of the binary tensor extension: the JSON, then the observation's bytes."""
    data = np.ascontiguousarray(obs, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "observation", "datatype": "FP32", "shape": list(obs.shape),
                                   "parameters": {"binary_data_size": len(data)}}],
                       "parameters": params, "outputs": outputs}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def read_binary_response(r) -> dict:
    """Outputs of a binary-extension response -> name: array (``data`` or the binary tail)."""
    n = int(r.headers["inference-header-content-length"])
    doc, tail, out = json.loads(r.content[:n]), r.content[n:], {}
    for o in doc["outputs"]:
        if "data" in o:
            out[o["name"]] = np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]], tail = np.frombuffer(tail[:size], "<f4").reshape(o["shape"]), tail[size:]
    assert not tail
    return out


def test_binary_extension_in_and_out(client):
    obs = OBS.astype(np.float32)
    params = {"operator": json.dumps({"kind": "identity"}), "method": json.dumps(FAST), "num_samples": "2",
              "seed": 4, "noise_sigma": "0.1"}
    raw, headers = binary_request(obs, params, [{"name": "mean", "parameters": {"binary_data": True}},
                                                {"name": "std"}])
    r = client.post("/v2/models/grf-32/infer", content=raw, headers=headers)
    assert r.status_code == 200, r.text
    out = read_binary_response(r)
    v1 = client.post("/v1/reconstruct", json=v1_body("grf-32", obs, operator={"kind": "identity"}, method=FAST,
                                                    num_samples=2, seed=4, noise_sigma=0.1)).json()
    np.testing.assert_array_equal(out["mean"], from_encoded(v1["mean"]))  # the binary output
    np.testing.assert_array_equal(out["std"], from_encoded(v1["std"]))  # the JSON one
    # binary_data_output: every output binary; a JSON input answered that way too
    req = infer_body(obs, "FP32", operator={"kind": "identity"}, method=FAST, num_samples=2, seed=4,
                     noise_sigma=0.1, binary_data_output=True)
    out2 = read_binary_response(client.post("/v2/models/grf-32/infer", json=req))
    assert set(out2) == {"mean", "std"}
    np.testing.assert_array_equal(out2["mean"], out["mean"])


def test_infer_batches_with_v1_jobs(client):
    """An infer waits in the same queue as /v1 jobs and runs in the same batch."""
    fields = dict(operator=INPAINT, method=FAST, num_samples=2, noise_sigma=0.05)
    client.manager.pause()
    jid = client.post("/v1/jobs", json=v1_body("grf-32", OBS, seed=1, **fields)).json()["id"]
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=client.post(
        "/v2/models/grf-32/infer", json=infer_body(OBS, seed=2, **fields))))
    t.start()
    wait_until(lambda: metric(client, "reconserve_queue_depth"), lambda n: n == 2, timeout=30,
               what="the infer queued beside the /v1 job")
    client.manager.resume()
    t.join(60)
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["parameters"]["batched_with"] == 2
    assert client.get(f"/v1/jobs/{jid}/result").json()["batched_with"] == 2


BAD = [  # (parameters of the request, status /v1 gives)
    (dict(operator={"kind": "nope"}), 404),
    (dict(operator={"kind": "identity"}, method={"name": "nope"}), 404),
    (dict(operator={"kind": "identity"}, num_samples=0), 422),
    (dict(operator={"kind": "identity"}, noise_sigma=-1), 422),
    (dict(operator={"kind": "super_resolution", "factor": 2}), 422),  # the observation's shape does not fit
    (dict(operator={"kind": "identity"}, colour="red"), 422),  # not a field of the request
]


def test_bad_requests_answer_as_v1_in_the_protocols_form(client):
    for params, status in BAD:
        r = client.post("/v2/models/grf-32/infer", json=infer_body(OBS, **params))
        v1 = client.post("/v1/reconstruct", json=v1_body("grf-32", OBS, **params))
        assert r.status_code == v1.status_code == status, (params, r.text)
        assert r.json() == {"error": v1.json()["error"]["message"]}


def obs_input(**over) -> dict:
    return {"name": "observation", "datatype": "FP64", "shape": [1, 32, 32], "data": OBS.ravel().tolist(), **over}


ID = {"operator": '{"kind": "identity"}'}
MALFORMED = [  # (body, part of the message)
    ({"inputs": []}, "exactly one input"),
    ({"inputs": [obs_input(name="x")], "parameters": ID}, "exactly one input"),
    ({"inputs": [obs_input(datatype="BYTES")], "parameters": ID}, "FP32"),
    ({"inputs": [obs_input(shape=[1, 32, 31])], "parameters": ID}, "as many values as the shape"),
    ({"inputs": [obs_input(shape=[1, -32, 32])], "parameters": ID}, "non-negative integers"),
    ({"inputs": [obs_input(data=None)], "parameters": ID}, "numbers"),
    ({"inputs": [obs_input()], "parameters": dict(ID, model="grf-32")}, "the model is the one in the URL"),
    ({"inputs": [obs_input()], "parameters": ID, "outputs": [{"name": "samples"}]}, "mean"),
    ({"inputs": [obs_input()], "parameters": ID, "outputs": [{"name": "std"}]}, "more than one sample"),
    ({"inputs": [obs_input()], "parameters": ID, "extra": 1}, "no other keys"),
    ([1, 2], "infer request"),
]


def test_malformed_infer_requests(client):
    for req, says in MALFORMED:
        r = client.post("/v2/models/grf-32/infer", json=req)
        assert r.status_code == 422 and set(r.json()) == {"error"}, (req, r.text)
        assert says in r.json()["error"], r.json()


def test_broken_bodies_and_binary_sizes(client):
    r = client.post("/v2/models/grf-32/infer", content=b"{not json")
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    raw, headers = binary_request(OBS, ID, [{"name": "mean"}])
    for bad in ({**headers, "Inference-Header-Content-Length": "x"},
                {**headers, "Inference-Header-Content-Length": str(len(raw) + 1)}):
        r = client.post("/v2/models/grf-32/infer", content=raw, headers=bad)
        assert r.status_code == 422 and "Inference-Header-Content-Length" in r.json()["error"]
    r = client.post("/v2/models/grf-32/infer", content=raw[:-4], headers=headers)  # 4 bytes short
    assert r.status_code == 422 and "binary_data_size" in r.json()["error"]
    r = client.post("/v2/models/grf-32/infer", content=raw + b"\0\0\0\0", headers=headers)
    assert r.status_code == 422 and "binary_data_size" in r.json()["error"]


def test_keys_and_the_queue_answer_in_the_protocols_form(make_client):
    c = make_client(api_keys=("k",))
    assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
    for r in (c.get("/v2/models/grf-32"), c.get("/v2/models/grf-32/ready"),
              c.post("/v2/models/grf-32/infer", json=infer_body(OBS, **ID))):
        assert r.status_code == 401 and set(r.json()) == {"error"} and "API key" in r.json()["error"]
    assert c.get("/v2/models/grf-32", headers={"X-API-Key": "k"}).status_code == 200
    full = make_client(queue_size=1, max_body_bytes=16000)
    full.manager.pause()
    assert full.post("/v1/jobs", json=v1_body("grf-32", OBS, operator={"kind": "identity"})).status_code == 202
    raw, headers = binary_request(OBS, ID, [{"name": "mean"}])  # 4 kB of data: within the body limit
    r = full.post("/v2/models/grf-32/infer", content=raw, headers=headers)
    v1 = full.post("/v1/reconstruct", json=v1_body("grf-32", OBS, operator={"kind": "identity"}))
    assert r.status_code == v1.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json() == {"error": v1.json()["error"]["message"]}
    r = full.post("/v2/models/grf-32/infer", json=infer_body(OBS, **ID))  # as JSON text: over 16 kB
    assert r.status_code == 413 and "over the limit of 16000 bytes" in r.json()["error"]


# ----------------------------------------------------------------------------- tritonclient, real server
@pytest.fixture(scope="module")
def server():
    from tests.helpers.server import start_server, stop_server
    proc, url = start_server()
    try:
        yield url
    finally:
        stop_server(proc)


def v1_mean(url: str, body: dict) -> np.ndarray:
    import httpx
    r = httpx.post(f"{url}/v1/reconstruct", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return from_encoded(r.json()["mean"])


@pytest.mark.slow
def test_tritonclient_metadata_readiness_and_infer(server):
    httpclient = pytest.importorskip("tritonclient.http")  # a dev dependency (pyproject's [dev] extra)
    from tritonclient.utils import InferenceServerException

    tc = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=300)
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("grf-32") and tc.is_model_ready("phantom-64") and not tc.is_model_ready("nope")
    assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
    assert tc.get_model_metadata("phantom-64")["inputs"][0]["shape"] == [1, -1, -1]

    def infer(model, obs, binary, **fields):
        inp = httpclient.InferInput("observation", list(obs.shape), "FP32")
        inp.set_data_from_numpy(obs, binary_data=binary)
        params = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
        outputs = [httpclient.InferRequestedOutput("mean", binary_data=binary)]
        return tc.infer(model, [inp], outputs=outputs, parameters=params).as_numpy("mean")

    grf = OBS.astype(np.float32)
    fields = dict(operator={"kind": "identity"}, method=FAST, noise_sigma=0.1, seed=5)
    np.testing.assert_array_equal(infer("grf-32", grf, False, **fields), v1_mean(server, v1_body("grf-32", grf, **fields)))
    rng = np.random.default_rng(1)
    phantom = dict(operator={"kind": "identity"}, method={"name": "fast", "steps": 2, "cg_iters": 0},
                   noise_sigma=0.1, seed=2)
    for size, binary in ((64, False), (256, True)):
        obs = rng.random((1, size, size)).astype(np.float32)
        mean = infer("phantom-64", obs, binary, **phantom)
        assert mean.shape == (1, size, size)
        np.testing.assert_array_equal(mean, v1_mean(server, v1_body("phantom-64", obs, **phantom)))
    with pytest.raises(InferenceServerException) as e:  # a bad request: /v1's status and message
        infer("grf-32", grf, True, operator={"kind": "nope"})
    assert e.value.status() == "404" and "operator.kind is not a known operator kind" in e.value.message()
