"""The HTTP API (API.md): catalogue, reconstruction, array formats, results, errors."""
import base64
import io
import threading

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
import torch
from PIL import Image

from guidance.solve import solve
from operators import DarcyResidual
from service.app import create_app
from service.settings import Settings
from tests.helpers.service import MASK, MODELS, OBS, body, decode, npy_b64, wait_status

ERROR_STATUSES = (401, 404, 409, 413, 422, 429, 503)


def assert_error(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- catalogue
def test_health_and_catalogue(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and "grf-32" in r.json()["models"]

    cards = {c["id"]: c for c in client.get("/v1/models").json()["models"]}
    grf = cards["grf-32"]
    assert grf["kind"] == "analytic" and grf["shape"] == [1, 32, 32] and grf["channels"] == ["x"]
    assert grf["pde"] is None and grf["prior"]["alpha"] == 2.0 and grf["prior"]["tau"] == 3.0
    assert [m["name"] for m in grf["methods"]] and "description" in grf and "value_range" in grf
    assert client.get("/v1/models/grf-32").json() == grf
    assert client.get("/v1/models/toy-darcy-16").json()["pde"]["kind"] == "darcy"

    ops = {o["kind"]: o for o in client.get("/v1/operators").json()["operators"]}
    assert set(ops) == {"identity", "inpainting", "sparse_points", "blur", "super_resolution",
                        "compressed_sensing", "mri", "ct"}
    assert ops["inpainting"]["schema"]["required"] == ["kind", "mask"]
    assert ops["sparse_points"]["observation_shape"] == "[N]"

    methods = {m["name"]: m for m in client.get("/v1/methods").json()["methods"]}
    assert {"dps", "ald", "diffusion_pde", "fast"} <= set(methods)
    for m in methods.values():
        assert "steps" in m["parameters"] and m["nfe_per_step"] >= 1
    assert methods["diffusion_pde"]["nfe_per_step"] == 2


def test_openapi_lists_registry_choices(client):
    spec = client.get("/openapi.json").json()
    comps = spec["components"]["schemas"]
    text = str(comps)
    for kind in ("inpainting", "compressed_sensing", "mri"):
        assert kind in text
    for name in ("dps", "ald", "diffusion_pde", "fast"):
        assert name in text
    assert "ReconstructionRequest" in comps
    assert "/v1/jobs/{job_id}/result.png" in spec["paths"]


def test_readyz_503_until_ready(monkeypatch):
    app = create_app(Settings(), MODELS)
    c = TestClient(app)  # lifespan not run: no worker
    assert_error(c.get("/readyz"), 503, "not_ready")
    assert_error(c.post("/v1/jobs", json=body()), 503, "not_ready")
    assert_error(c.post("/v1/reconstruct", json=body()), 503, "not_ready")

    release = threading.Event()

    def slow_load(*folders, device="cpu", skipped=None):
        release.wait(20)
        return MODELS

    monkeypatch.setattr("service.deps.load_models", slow_load)
    with TestClient(create_app(Settings())) as c:  # models load in the background
        assert_error(c.get("/readyz"), 503, "not_ready")
        assert_error(c.get("/v1/models"), 503, "not_ready")
        assert c.get("/healthz").status_code == 200
        release.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.02)
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/reconstruct", json=body()).status_code == 200


# ----------------------------------------------------------------------------- reconstruction
def test_reconstruct_matches_the_library(client):
    r = client.post("/v1/reconstruct", json=body(**{"return": ["mean", "std", "samples"]}))
    assert r.status_code == 200, r.text
    res = r.json()
    assert {"mean", "std", "samples", "metrics", "nfe", "elapsed_s", "seed", "model", "method"} <= set(res)
    assert res["model"] == "grf-32" and res["seed"] == 3 and res["nfe"] == 8 and res["batched_with"] == 1
    # every parameter as used, defaults filled in
    from guidance.registry import METHODS
    assert set(res["method"]) == {"name"} | set(METHODS["fast"].describe()["parameters"])
    assert res["method"]["name"] == "fast" and res["method"]["steps"] == 8
    for k in ("mean", "std"):
        assert res[k]["shape"] == [1, 32, 32] and res[k]["dtype"] == "float32"
    assert res["samples"]["shape"] == [2, 1, 32, 32]

    # the same numbers as guidance.solve on the same problem (unobserved entries ignored)
    from operators.spec import build_operator
    sol = solve(MODELS["grf-32"], build_operator({"kind": "inpainting", "mask": MASK}, (1, 32, 32)),
                OBS * MASK, method="fast", params={"steps": 8}, num_samples=2, seed=3)
    np.testing.assert_array_equal(decode(res["samples"]), sol.samples)
    np.testing.assert_array_equal(decode(res["mean"]), sol.mean)
    assert res["metrics"]["data_residual"] == pytest.approx(sol.metrics["data_residual"], abs=1e-12)
    assert res["metrics"]["data_residual"] < 1e-6  # noiseless inpainting: exact data consistency
    assert res["metrics"]["pde_residual"] is None


def test_return_selects_arrays_and_single_sample_has_no_std(client):
    res = client.post("/v1/reconstruct", json=body(**{"return": ["samples"]})).json()
    assert res["mean"] is None and res["std"] is None and res["samples"]["shape"] == [2, 1, 32, 32]
    res = client.post("/v1/reconstruct", json=body(num_samples=1)).json()
    assert res["mean"]["shape"] == [1, 32, 32] and res["std"] is None and res["samples"] is None
    res = client.post("/v1/reconstruct", json=body(**{"return": None, "seed": None})).json()
    assert res["mean"] is not None and res["std"] is not None and res["seed"] == 0


def test_compressed_sensing_and_its_picture(client):
    req = {"model": "grf-32", "operator": {"kind": "compressed_sensing", "m": 100, "seed": 2},
           "observation": np.linspace(-1, 1, 100).tolist(), "noise_sigma": 0.01,
           "method": {"name": "dps", "steps": 5}}
    jid = client.post("/v1/jobs", json=req).json()["id"]
    assert wait_status(client, jid)["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{jid}/result").json()["metrics"]["data_residual"] > 0
    png = client.get(f"/v1/jobs/{jid}/result.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_nested_lists_and_methods(client):
    small = {"model": "grf-32", "operator": {"kind": "sparse_points", "points": [[0, 1, 2], [0, 30, 31]]},
             "observation": [0.5, -1.0], "method": {"name": "dps", "steps": 6, "zeta": 0.5}}
    res = client.post("/v1/reconstruct", json=small).json()
    assert res["method"]["name"] == "dps" and res["method"]["zeta"] == 0.5 and res["nfe"] == 6
    sr = {"model": "grf-32", "operator": {"kind": "super_resolution", "factor": 4},
          "observation": np.zeros((1, 8, 8)).tolist(), "noise_sigma": 0.05,
          "method": {"name": "ald", "steps": 5, "final_corrector_steps": 3}}
    r = client.post("/v1/reconstruct", json=sr)
    assert r.status_code == 200, r.text
    assert r.json()["method"]["final_corrector_steps"] == 3


def test_pde_model_default_method_and_residual(client):
    y = np.zeros((2, 16, 16))
    y[0] = 7.5
    req = {"model": "toy-darcy-16", "operator": {"kind": "identity"}, "observation": {"npy": npy_b64(y)},
           "noise_sigma": 0.5}
    res = client.post("/v1/reconstruct", json=req).json()
    assert res["method"]["name"] == "fast" and res["method"]["steps"] == 6  # the card's first method
    assert res["metrics"]["pde_residual"] is not None and res["metrics"]["pde_residual"] > 0
    res2 = client.post("/v1/reconstruct", json=req | {"pde": {"kind": "darcy"},
                                                       "method": {"name": "fast", "steps": 6, "zeta_pde": 0.1}})
    assert res2.status_code == 200, res2.text
    assert res2.json()["metrics"]["pde_residual"] is not None
    assert_error(client.post("/v1/reconstruct", json=req | {"pde": {"kind": "poisson"}}), 422)
    assert_error(client.post("/v1/reconstruct", json=body(pde={"kind": "darcy"})), 422)
    r = client.post("/v1/jobs", json=req)
    wait_status(client, r.json()["id"])
    png = client.get(f"/v1/jobs/{r.json()['id']}/result.png")
    im = Image.open(io.BytesIO(png.content))
    assert png.headers["content-type"] == "image/png" and im.format == "PNG"
    assert im.size[1] > im.size[0] / 3  # two rows of panels (a, u)


def test_image_encodings(client):
    ident = {"model": "grf-32", "operator": {"kind": "identity"}, "method": {"name": "fast", "steps": 5}}
    img8 = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    buf = io.BytesIO()
    Image.fromarray(img8).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    res = client.post("/v1/reconstruct", json=ident | {"observation": {"png": png}}).json()
    # noiseless identity: the fast sampler's data step returns the observation exactly
    np.testing.assert_allclose(decode(res["mean"])[0], img8 / 255.0, atol=1e-6)

    img16 = (np.arange(32 * 32) * 60).astype(np.uint16).reshape(32, 32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, img16)
    tif = base64.b64encode(buf.getvalue()).decode()
    res = client.post("/v1/reconstruct", json=ident | {"observation": {"tiff": tif}}).json()
    np.testing.assert_allclose(decode(res["mean"])[0], img16 / 65535.0, atol=1e-6)

    f = np.linspace(-2, 2, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, f)
    res = client.post("/v1/reconstruct", json=ident | {"observation": {"tiff": base64.b64encode(
        buf.getvalue()).decode()}}).json()
    np.testing.assert_allclose(decode(res["mean"]), f, atol=1e-6)


def test_multipart_with_file_parts(client):
    import json
    req = body(observation={"file": "obs"}, operator={"kind": "inpainting", "mask": {"file": "mask"}})
    buf = io.BytesIO()
    Image.fromarray((MASK * 255).astype(np.uint8)).save(buf, format="PNG")
    obs = io.BytesIO()
    np.save(obs, OBS)
    r = client.post("/v1/reconstruct", data={"request": json.dumps(req)},
                    files={"obs": ("y.npy", obs.getvalue(), "application/octet-stream"),
                           "mask": ("mask.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    ref = client.post("/v1/reconstruct", json=body()).json()
    np.testing.assert_array_equal(decode(r.json()["mean"]), decode(ref["mean"]))
    # the request part may itself be a file; a missing file part is a 422
    r = client.post("/v1/jobs", files={"request": ("r.json", json.dumps(req).encode(), "application/json"),
                                       "obs": ("y.npy", obs.getvalue())})
    assert_error(r, 422)  # the mask part is missing
    assert_error(client.post("/v1/jobs", files={"obs": ("y.npy", obs.getvalue())}), 422)


def test_result_formats(client):
    jid = client.post("/v1/jobs", json=body()).json()["id"]
    wait_status(client, jid)
    res = client.get(f"/v1/jobs/{jid}/result").json()
    r = client.get(f"/v1/jobs/{jid}/result", headers={"Accept": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (1, 32, 32)
    np.testing.assert_array_equal(arr, decode(res["mean"]))
    png = client.get(f"/v1/jobs/{jid}/result.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(png.content))
    im.verify()
    assert im.size[0] > 3 * 32


# ----------------------------------------------------------------------------- auth
def test_auth(make_client):
    c = make_client(api_keys="key-one, key-two")
    assert_error(c.get("/v1/models"), 401, "unauthorized")
    assert_error(c.get("/v1/models", headers={"X-API-Key": "wrong"}), 401)
    assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(c.post("/v1/jobs", json=body()), 401)
    assert_error(c.get("/metrics"), 401)
    assert c.get("/v1/models", headers={"X-API-Key": "key-two"}).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer key-one"}).status_code == 200
    assert c.post("/v1/reconstruct", json=body(), headers={"X-API-Key": "key-one"}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    open_client = make_client()
    assert open_client.get("/v1/models").status_code == 200


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("RECONSERVE_API_KEYS", "a, b,,c")
    monkeypatch.setenv("RECONSERVE_QUEUE_SIZE", "7")
    s = Settings()
    import torch
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert s.api_keys == ("a", "b", "c") and s.queue_size == 7 and s.device == auto  # default "auto"
    monkeypatch.setenv("RECONSERVE_API_KEYS", "")
    assert Settings().api_keys == ()
    monkeypatch.setenv("RECONSERVE_DEVICE", "cpu")
    assert Settings().device == "cpu" and Settings(device="AUTO").device == auto


# ----------------------------------------------------------------------------- errors
def test_404s(client):
    assert_error(client.post("/v1/jobs", json=body(model="no-such-model")), 404, "unknown_model")
    assert_error(client.post("/v1/jobs", json=body(method={"name": "magic"})), 404, "unknown_method")
    assert_error(client.post("/v1/reconstruct", json=body(operator={"kind": "fisheye"})), 404,
                 "unknown_operator")
    assert_error(client.get("/v1/models/no-such-model"), 404, "unknown_model")
    for path in ("", "/result", "/result.png", "/events"):
        assert_error(client.get(f"/v1/jobs/0123abc{path}"), 404, "unknown_job")
    assert_error(client.delete("/v1/jobs/0123abc"), 404, "unknown_job")
    assert_error(client.get("/v2/nothing"), 404)
    assert_error(client.put("/v1/models"), 405)


def test_409_before_finished(client):
    client.manager.pause()
    jid = client.post("/v1/jobs", json=body()).json()["id"]
    assert client.get(f"/v1/jobs/{jid}").json()["status"] == "queued"
    assert_error(client.get(f"/v1/jobs/{jid}/result"), 409, "not_finished")
    assert_error(client.get(f"/v1/jobs/{jid}/result.png"), 409)
    assert_error(client.get(f"/v1/jobs/{jid}/result", headers={"Accept": "application/x-npy"}), 409)
    client.manager.resume()
    assert wait_status(client, jid)["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{jid}/result").status_code == 200


def test_413_body_and_arrays(make_client):
    c = make_client(max_body_bytes=40000, max_array_elements=1000)
    big = body(observation=[0.0] * 20000)
    assert_error(c.post("/v1/jobs", json=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the size is counted while reading
        yield b'{"model": "grf-32", "observation": ['
        for _ in range(2000):
            yield b"0.0, " * 20
        yield b"0]}"
    assert_error(c.post("/v1/jobs", content=chunks()), 413, "body_too_large")
    # an array over max_array_elements (npy: the header alone decides)
    assert_error(c.post("/v1/jobs", json=body(observation={"npy": npy_b64(np.zeros((1, 32, 32)))})), 413,
                 "array_too_large")
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False,
                                               "shape": (100000, 100000)})
    huge = base64.b64encode(hdr.getvalue() + b"\0" * 64).decode()  # 10^10 elements announced
    assert_error(c.post("/v1/jobs", json=body(observation={"npy": huge})), 413)
    assert_error(c.post("/v1/jobs", json=body(observation=[0.0] * 1001)), 413)


def _npy_raw(arr, allow_pickle=False) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return base64.b64encode(buf.getvalue()).decode()


BAD_422 = {
    "wrong observation shape": body(observation={"npy": npy_b64(np.zeros((1, 16, 16)))}),
    "observation with the channel axis last": body(observation={"npy": npy_b64(np.zeros((32, 32, 1)))}),
    "NaN in npy": body(observation={"npy": npy_b64(np.full((1, 32, 32), np.nan))}),
    "inf in npy": body(observation={"npy": npy_b64(np.full((1, 32, 32), np.inf))}),
    "NaN in mask": body(operator={"kind": "inpainting", "mask": {"npy": npy_b64(np.full((32, 32), np.nan))}}),
    "bad base64": body(observation={"npy": "%%%not base64%%%"}),
    "not npy bytes": body(observation={"npy": base64.b64encode(b"hello world").decode()}),
    "pickled object npy": body(observation={"npy": _npy_raw(np.array([{"a": 1}, None], dtype=object),
                                                             allow_pickle=True)}),
    "structured dtype npy": body(observation={"npy": _npy_raw(np.zeros(3, dtype=[("a", "<f8"), ("b", "<i4")]))}),
    "string dtype npy": body(observation={"npy": _npy_raw(np.array(["a", "b"]))}),
    "complex npy": body(observation={"npy": _npy_raw(np.zeros((1, 32, 32), dtype=np.complex128))}),
    "truncated npy": body(observation={"npy": base64.b64encode(base64.b64decode(npy_b64(OBS))[:200]).decode()}),
    "bad png": body(observation={"png": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()}),
    "bad tiff": body(observation={"tiff": base64.b64encode(b"II*\x00garbage").decode()}),
    "two encodings": body(observation={"npy": npy_b64(OBS), "png": "x"}),
    "ragged list": body(observation=[[1, 2], [3]]),
    "strings in list": body(observation=["a", "b"]),
    "observation a string": body(observation="0,1,2"),
    "steps 0": body(method={"name": "fast", "steps": 0}),
    "steps over max": body(method={"name": "fast", "steps": 10**6}),
    "num_samples 0": body(num_samples=0),
    "num_samples over max": body(num_samples=10**4),
    "negative noise": body(noise_sigma=-0.1),
    "negative seed": body(seed=-1),
    "seed too large": body(seed=2**70),
    "unknown method param": body(method={"name": "fast", "steps": 5, "zeta": 1.0}),
    "negative lam": body(method={"name": "fast", "steps": 5, "lam": -1.0}),
    "param of wrong type": body(method={"name": "fast", "steps": 5, "lam": [1, 2]}),
    "unknown schedule": body(method={"name": "fast", "steps": 5, "schedule": "zigzag"}),
    "unhashable schedule": body(method={"name": "fast", "steps": 5, "schedule": ["x"]}),
    "zeta_obs of wrong length": body(method={"name": "fast", "steps": 5, "zeta_obs": [1, 2, 3]}),
    "too many corrector steps": body(method={"name": "ald", "steps": 100, "corrector_steps": 10**6}),
    "mask of wrong shape": body(operator={"kind": "inpainting", "mask": np.ones((16, 16)).tolist()}),
    "mask not binary": body(operator={"kind": "inpainting", "mask": np.full((32, 32), 0.5).tolist()}),
    "mask missing": body(operator={"kind": "inpainting"}),
    "operator kind missing": body(operator={"mask": []}),
    "operator not an object": body(operator="blur"),
    "factor does not divide": body(operator={"kind": "super_resolution", "factor": 3},
                                   observation=np.zeros((1, 10, 10)).tolist()),
    "observation vs operator mismatch": body(operator={"kind": "super_resolution", "factor": 2}),
    "points out of range": body(operator={"kind": "sparse_points", "points": [[0, 40, 1]]}, observation=[1.0]),
    "even blur kernel": body(operator={"kind": "blur", "kernel": np.ones((4, 4)).tolist()}),
    "unknown operator param": body(operator={"kind": "identity", "factor": 2}),
    "return unknown": body(**{"return": ["mean", "median"]}),
    "extra field": body(noise=0.1),
    "missing observation": {k: v for k, v in body().items() if k != "observation"},
    "pde on a model without one": body(pde={"kind": "darcy"}),
    "model not a string": body(model=["grf-32"]),
}


@pytest.mark.parametrize("name", BAD_422)
def test_422_invalid_requests(client, name):
    err = assert_error(client.post("/v1/jobs", json=BAD_422[name]), 422)
    assert "%%%" not in err["message"]


@pytest.mark.parametrize("raw", [
    b'{"model": "grf-32", "noise_sigma": NaN}', b'{"model": "grf-32", "noise_sigma": Infinity}',
    b'{"noise_sigma": -Infinity}', b'{"observation": [1e999]}', b"{not json", b"", b"[]", b"null",
    b'"a string"', b"[" * 100000, b'{"model": "\xff\xfe"}', b"1" * 5000,
])
def test_422_malformed_json(client, raw):
    assert_error(client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"}), 422)


def test_errors_never_echo_input(client):
    marker = "SECRET-MARKER-" + "x" * 50
    for req in (body(model=marker), body(method={"name": "fast", "steps": 5, marker: 1}),
                body(operator={"kind": "identity", marker: 1}), body(**{marker: 1}),
                body(method={"name": "fast", "steps": 5, "schedule": marker})):
        r = client.post("/v1/jobs", json=req)
        assert r.status_code in (404, 422)
        assert marker not in r.text


def test_no_input_gives_a_5xx(client):
    weird = [
        body(observation={"npy": None}), body(observation={"file": "nope"}), body(operator={"kind": None}),
        body(operator={"kind": "blur", "gaussian": {"sigma": "wide"}}), body(operator={"kind": "blur"}),
        body(operator={"kind": "compressed_sensing", "m": 10**9}),
        body(operator={"kind": "compressed_sensing", "m": 5, "matrix": [[1.0]]}, observation=[1.0] * 5),
        body(operator={"kind": "mri", "mask": MASK.tolist()}, observation=np.zeros((2, 32, 32)).tolist()),
        body(method={"name": "fast", "steps": 5.5}), body(method={"name": "fast", "steps": 5, "eta": {"a": 1}}),
        body(method={"name": "diffusion_pde", "steps": 3, "zeta_obs": []}), body(method=[]),
        body(method={"steps": 3}), body(pde=[]), body(num_samples=True), body(seed="1"),
        body(noise_sigma=1e308), body(**{"return": "mean"}),
        body(observation=[[[[[[[[[[[1.0]]]]]]]]]]]),
        body(operator={"kind": "inpainting", "mask": {"npy": npy_b64(np.ones((32, 32), dtype=bool))}}),
        body(operator={"kind": "sparse_points", "points": [[0, 1.5, 2]]}, observation=[1.0]),
    ]
    for req in weird:
        r = client.post("/v1/reconstruct", json=req)
        assert r.status_code < 500, (req, r.text)
        assert set(r.json()) == {"error"} or r.status_code == 200


def test_pde_completion(client):
    """The forward problem (only a observed) gets u re-solved from each sample's a; u observed keeps it."""
    pts = [[0, i, j] for i, j in [(2, 3), (7, 7), (12, 5), (4, 13)]]
    fwd = {"model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": pts},
           "observation": [3.0, 12.0, 12.0, 3.0], "num_samples": 1}
    res = client.post("/v1/reconstruct", json=fwd).json()
    assert res["metrics"]["completed"] is True and res["metrics"]["pde_residual"] < 1e-6
    two = client.post("/v1/reconstruct", json=fwd | {"num_samples": 2, "return": ["samples"]}).json()
    xs = torch.as_tensor(decode(two["samples"]), dtype=torch.float64)
    assert float(DarcyResidual((2, 16, 16)).relative_residual(xs).max()) < 1e-4  # every sample a pair (float32)
    off = client.post("/v1/reconstruct", json=fwd | {"completion": "off"}).json()
    assert off["metrics"]["completed"] is False and off["metrics"]["pde_residual"] > 1e-3
    inv = fwd | {"operator": {"kind": "sparse_points", "points": [[1, i, j] for _, i, j in pts]},
                 "observation": [0.01, 0.02, 0.01, 0.0]}
    assert client.post("/v1/reconstruct", json=inv).json()["metrics"]["completed"] is False
    assert client.post("/v1/reconstruct", json=inv | {"completion": "solve"}).json()["metrics"]["completed"]
    assert_error(client.post("/v1/reconstruct", json=fwd | {"completion": "always"}), 422)
    img = client.post("/v1/reconstruct", json=body(completion="solve")).json()
    assert img["metrics"]["completed"] is False  # no PDE: nothing to complete


# ----------------------------------------------------------------------------- found by the schema fuzzer
def test_metrics_content_type_and_401_are_documented(make_client):
    """``GET /metrics`` answers Prometheus text, which its OpenAPI entry declared as JSON; with API
    keys on it answers a JSON 401 that it did not declare."""
    c = make_client(api_keys=("k",))
    op = c.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert list(op["200"]["content"]) == ["text/plain"]
    assert op["401"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    r = c.get("/metrics")
    assert_error(r, 401, "unauthorized")
    r = c.get("/metrics", headers={"X-API-Key": "k"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_blur_with_a_vanishing_gaussian_sigma_is_the_identity(client):
    """``gaussian.sigma`` 5e-324 (positive, so valid) made every kernel entry 0/0 = NaN: the job
    "succeeded" with NaN metrics (``data_residual`` null). Its limit is the unit impulse."""
    blur = client.post("/v1/reconstruct", json=body(
        operator={"kind": "blur", "gaussian": {"sigma": 5e-324}}, observation=OBS.tolist())).json()
    ident = client.post("/v1/reconstruct", json=body(operator={"kind": "identity"}, observation=OBS.tolist())).json()
    assert blur["metrics"]["data_residual"] == pytest.approx(ident["metrics"]["data_residual"], abs=1e-9)
    np.testing.assert_allclose(decode(blur["mean"]), decode(ident["mean"]), atol=1e-6)


def test_result_metrics_document_a_null_data_residual(client):
    """A non-finite data residual is answered as null (``guidance.solve.solve_batch (finite_metrics)``); the schema
    declared it a number."""
    spec = client.get("/openapi.json").json()
    res = spec["components"]["schemas"]["ResultMetrics"]
    assert {"type": "null"} in res["properties"]["data_residual"]["anyOf"]
    assert "data_residual" in res["required"]


def test_a_method_name_that_is_not_a_string_is_a_422(client):
    """``method.name`` an object or a list answered 500 (``name in METHODS`` on an unhashable)."""
    for name in ({}, [], ["fast"]):
        assert_error(client.post("/v1/jobs", json=body(method={"name": name, "steps": None})), 422, "invalid_request")


def test_sparse_points_on_a_model_with_value_ranges_is_not_a_500(client):
    """The value-range check of the observation (``service/ranges.py``) compared a float64 probe
    with a float32 one: every sparse-points request on toy-darcy-16 answered 500."""
    req = {"model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": [[0, 2, 3], [1, 4, 13]]},
           "observation": [3.0, 0.01], "method": {"name": "fast", "steps": 3}, "num_samples": 1}
    r = client.post("/v1/reconstruct", json=req)
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("method", [{"name": "dps", "zeta": [0, 0]}, {"name": "diffusion_pde", "zeta_obs": [0, 0]},
                                    {"name": "diffusion_pde", "zeta_obs": [0, 0], "zeta_pde": 1.0}])
def test_all_zero_per_channel_observation_weights_run(client, method):
    """Per-channel observation weights all 0 (no data term: prior or PDE guidance only) failed
    every job with "'int' object has no attribute 'sum'" (``guidance.terms.data_loss``)."""
    req = {"model": "toy-darcy-16", "operator": {"kind": "sparse_points", "points": [[0, 2, 3], [1, 4, 13]]},
           "observation": [3.0, 0.01], "method": dict(method, steps=3), "num_samples": 1}
    r = client.post("/v1/reconstruct", json=req)
    assert r.status_code == 200, r.text[:300]
