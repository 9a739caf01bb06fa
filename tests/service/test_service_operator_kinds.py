"""The service knows operator kinds and methods only through their own declarations.

The request's OpenAPI schema is the union of the kinds' wire models (by ``kind``) and of the
methods' request models (by ``name``), both derived by ``service.api`` from the declarations; operator arrays take every array encoding; error codes are kept;
a per-channel weight with a channel-mixing operator is refused with a 422 that says why.
"""
import base64
import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from guidance.registry import METHODS
from operators.spec import OPERATORS
from service.api.methods import method_model
from service.api.operators import operator_schema
from tests.helpers.service import MASK, body, decode, npy_b64


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert code is None or err["code"] == code, err
    return err


def test_openapi_request_is_the_union_of_the_kinds_and_methods(client):
    comps = client.get("/openapi.json").json()["components"]["schemas"]
    props = comps["ReconstructionRequest"]["properties"]
    op = props["operator"]
    assert op["discriminator"]["propertyName"] == "kind"
    assert op["discriminator"]["mapping"] == {k: f"#/components/schemas/{cls.Spec.__name__}"
                                              for k, cls in OPERATORS.items()}
    for kind, cls in OPERATORS.items():
        spec = comps[cls.Spec.__name__]
        assert spec["additionalProperties"] is False and spec["properties"]["kind"]["const"] == kind
        own = operator_schema(cls)  # GET /v1/operators shows the same parameters
        assert set(spec["properties"]) == set(own["properties"])
        for name in cls.Spec.array_fields():  # arrays: a nested list or any encoding
            flat = json.dumps(spec["properties"][name])
            assert all(f'"{enc}"' in flat for enc in ("npy", "png", "tiff", "file")), (kind, name)
    named, default = props["method"]["anyOf"][0]["oneOf"]
    assert named["discriminator"]["propertyName"] == "name"
    assert set(named["discriminator"]["mapping"]) == set(METHODS)
    assert default == {"$ref": "#/components/schemas/MethodDefaults"}
    for name, method in METHODS.items():
        m = comps[method_model(method).__name__]
        assert m["additionalProperties"] is False and m["required"] == ["name"]
        steps = m["properties"]["steps"]["anyOf"][0]
        assert steps == {"type": "integer", "minimum": 1}
        assert all(p.get("description") for k, p in m["properties"].items()), name
        assert all("default" not in p for p in m["properties"].values())  # omitted: the card's tuned value
    fast = comps["FastMethod"]["properties"]
    assert fast["cg_iters"]["minimum"] == 0 and fast["cg_iters"]["maximum"] == 50
    assert set(fast["schedule"]["enum"]) >= {"karras", "ve"}
    assert fast["lam"]["exclusiveMinimum"] == 0 and fast["zeta_obs"]["anyOf"][1]["type"] == "array"


def test_catalogue_comes_from_the_classes(client):
    ops = client.get("/v1/operators").json()["operators"]
    assert [o["kind"] for o in ops] == list(OPERATORS)
    for o in ops:
        cls = OPERATORS[o["kind"]]
        assert o["observation_shape"] == cls.observation_shape and o["schema"] == operator_schema(cls)


def test_error_codes(client):
    assert_error(client.post("/v1/jobs", json=body(operator={"kind": "fisheye"})), 404, "unknown_operator")
    assert_error(client.post("/v1/jobs", json=body(method={"name": "magic"})), 404, "unknown_method")
    err = assert_error(client.post("/v1/jobs", json=body(operator={"kind": "blur", "gaussian": {"sigma": -1}})),
                       422, "invalid_operator")
    assert err["message"].startswith("operator.gaussian.sigma: must be > 0")
    err = assert_error(client.post("/v1/jobs", json=body(operator={"kind": "identity", "factor": 2})),
                       422, "invalid_operator")
    assert "unknown parameter(s) ['factor']" in err["message"]
    err = assert_error(client.post("/v1/jobs", json=body(method={"name": "fast", "lam": -1})), 422, "invalid_method")
    assert err["message"].startswith("method.lam:")
    err = assert_error(client.post("/v1/jobs", json=body(method={"name": "fast", "zeta": 1})), 422, "invalid_method")
    assert "unknown parameter(s) ['zeta']" in err["message"] and "zeta_obs" in err["message"]
    assert_error(client.post("/v1/jobs", json=body(method={"name": "ald", "step_rule": "x"})), 422, "invalid_method")
    assert_error(client.post("/v1/jobs", json=body(method={"name": "fast", "steps": 0})), 422, "invalid_method")
    assert_error(client.post("/v1/jobs", json=body(operator={"kind": 3})), 422, "invalid_request")
    assert_error(client.post("/v1/jobs", json=body(method=[])), 422, "invalid_request")
    # a method may be omitted, or carry only some parameters, with or without a name
    for method in (None, {"steps": 3}, {"name": None, "steps": 3}, {"name": "fast"}, {"name": "dps", "steps": 2},
                   {"name": "fast", "steps": None, "zeta_obs": [1.0]}):
        b = body(num_samples=1) if method is None else body(num_samples=1, method=method)
        if method is None:
            b.pop("method")
        r = client.post("/v1/jobs", json=b)
        assert r.status_code == 202, (method, r.text)


def _png(a) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.asarray(a) * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tiff(a) -> str:
    buf = io.BytesIO()
    tifffile.imwrite(buf, (np.asarray(a) * 255).astype(np.uint8))
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("encoding", ["list", "npy", "png", "tiff", "file"])
def test_operator_arrays_take_every_encoding(client, encoding):
    ref = client.post("/v1/reconstruct", json=body()).json()
    if encoding == "file":
        buf = io.BytesIO()
        np.save(buf, MASK)
        req = body(operator={"kind": "inpainting", "mask": {"file": "m"}})
        r = client.post("/v1/reconstruct", data={"request": json.dumps(req)},
                        files={"m": ("m.npy", buf.getvalue(), "application/octet-stream")})
    else:
        mask = {"list": MASK.tolist(), "npy": {"npy": npy_b64(MASK)}, "png": {"png": _png(MASK)},
                "tiff": {"tiff": _tiff(MASK)}}[encoding]
        r = client.post("/v1/reconstruct", json=body(operator={"kind": "inpainting", "mask": mask}))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.json()["mean"]), decode(ref["mean"]))


# ----------------------------------------------------------------------------- per-channel weights
PTS = [[0, 3, 4], [1, 8, 9], [0, 5, 5], [1, 2, 12]]


def _pde_job(operator, observation, method):
    return {"model": "toy-darcy-16", "operator": operator, "observation": observation, "method": method,
            "num_samples": 1}


@pytest.mark.parametrize("name,field", [("fast", "zeta_obs"), ("dps", "zeta"), ("diffusion_pde", "zeta_obs")])
def test_per_channel_weights_with_a_channel_mixing_operator_are_refused(client, name, field):
    cs = {"kind": "compressed_sensing", "m": 20, "seed": 1}
    y = np.zeros(20).tolist()
    err = assert_error(client.post("/v1/jobs", json=_pde_job(cs, y, {"name": name, "steps": 2, field: [1.0, 10.0]})),
                       422, "invalid_method")
    assert err["message"].startswith(f"method.{field}: per-channel weights") and "mixes channels" in err["message"]
    assert "send one number" in err["message"]
    # equal weights are one number; one number is fine; a separable operator takes per-channel weights
    for w in ([2.0, 2.0], 2.0):
        assert client.post("/v1/jobs", json=_pde_job(cs, y, {"name": name, "steps": 2, field: w})).status_code == 202
    pts = {"kind": "sparse_points", "points": PTS}
    r = client.post("/v1/jobs", json=_pde_job(pts, [0.0] * 4, {"name": name, "steps": 2, field: [1.0, 10.0]}))
    assert r.status_code == 202, r.text


def test_per_channel_weights_from_the_card_are_named_as_such(make_client):
    from tests.helpers.service import MODELS
    from models.checkpoint import LoadedModel
    toy = MODELS["toy-darcy-16"]
    card = dict(toy.card, id="toy-tuned", methods=[{"name": "fast", "steps": 2, "zeta_obs": [1.0, 100.0]}])
    c = make_client(models={"toy-tuned": LoadedModel(card, toy.denoiser)})
    job = dict(_pde_job({"kind": "compressed_sensing", "m": 20}, np.zeros(20).tolist(), None), model="toy-tuned")
    job.pop("method")
    err = assert_error(c.post("/v1/jobs", json=job), 422, "invalid_method")
    assert "tuned default" in err["message"] and "toy-tuned" in err["message"]
    job["method"] = {"zeta_obs": 5.0}  # the user's one number replaces the card's
    assert c.post("/v1/jobs", json=job).status_code == 202
