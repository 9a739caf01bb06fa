"""The web page's server side, in process (its browser test: tests/browser/test_web_page.py): `GET /`
and its modules reach nothing but this server, and `POST /web/demo` observes a held-out example
through the server's own operator."""
import re

import numpy as np
import pytest

from models.checkpoint import LoadedModel
from models.data import phantoms
from service.routers.web import EXAMPLE_SEED, PAGE_DIR
from tests.helpers.service import MODELS, WhiteDenoiser, decode

#: A one-channel 64 x 64 model whose card says it was trained on phantoms (its prior is a plain
#: Gaussian: the demonstration does not use the network).
PHANTOM_CARD = {
    "id": "toy-phantom-64", "kind": "image", "shape": [1, 64, 64], "channels": ["intensity"],
    "pde": None, "prior": None, "value_range": [0.0, 1.0], "description": "test model",
    "training": {"data": "phantom"}, "normalization": {"shift": [0.5], "scale": [0.5]},
    "methods": [{"name": "fast", "steps": 4}], "sigma_min": 0.002, "sigma_max": 80.0,
}


@pytest.fixture
def web(make_client):
    return make_client(models=dict(MODELS, **{"toy-phantom-64": LoadedModel(PHANTOM_CARD, WhiteDenoiser((1, 64, 64)))}))


def module_imports(source: str) -> list[str]:
    return re.findall(r"""^import .*? from "([^"]+)";""", source, flags=re.M | re.S)


def test_the_page_and_its_modules_reach_only_this_server(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = re.findall(r"""(?:src|href)="([^"]*)\"""", r.text)
    assert refs and all(u.startswith(("/", "data:", "#")) and not u.startswith("//") for u in refs), refs
    seen, todo = set(), ["app.js"]
    while todo:  # every module app.js imports, transitively: served, relative, no other host
        name = todo.pop()
        seen.add(name)
        js = client.get(f"/web/{name}")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"], name
        assert not re.search(r"https?://", js.text), f"{name} names another host"
        for imp in module_imports(js.text):
            assert imp.startswith("./"), (name, imp)
            if imp[2:] not in seen:
                todo.append(imp[2:])
    assert seen == {p.name for p in PAGE_DIR.glob("*.js")}  # no module left unused
    assert client.get("/web/style.css").status_code == 200
    assert client.get("/docs").status_code == 200  # the interactive docs stay where they were
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/web/demo" not in paths


def test_demo_observes_a_held_out_example_through_the_operator(web):
    r = web.post("/web/demo", json={"model": "toy-phantom-64", "operator": {"kind": "super_resolution", "factor": 4},
                                    "example": 2})
    assert r.status_code == 200, r.text
    truth, obs = decode(r.json()["truth"]), decode(r.json()["observation"])
    np.testing.assert_allclose(truth, phantoms(1, 64, EXAMPLE_SEED + 2)[0], atol=1e-7)
    blocks = truth.reshape(1, 16, 4, 16, 4).mean(axis=(2, 4))  # the mean over each 4 x 4 block
    np.testing.assert_allclose(obs, blocks, atol=1e-6)


def test_demo_noise_is_seeded_and_of_the_stated_size(web):
    def observe(seed):
        r = web.post("/web/demo", json={"model": "toy-phantom-64", "operator": {"kind": "identity"},
                                        "noise_sigma": 0.1, "seed": seed})
        assert r.status_code == 200, r.text
        return decode(r.json()["observation"]) - decode(r.json()["truth"])
    noise = observe(5)
    np.testing.assert_array_equal(noise, observe(5))
    assert not np.array_equal(noise, observe(6))
    assert 0.09 < noise.std() < 0.11 and abs(noise.mean()) < 0.01  # 4096 draws: std within 10 %


def test_demo_with_a_drawn_mask_sent_inline(web):
    mask = (np.arange(64 * 64).reshape(64, 64) % 3 == 0).astype(np.float32)
    from service.codecs import to_npy_field
    r = web.post("/web/demo", json={"model": "toy-phantom-64", "operator": {"kind": "inpainting", "mask": to_npy_field(mask)}})
    assert r.status_code == 200, r.text
    obs, truth = decode(r.json()["observation"]), decode(r.json()["truth"])
    np.testing.assert_allclose(obs, truth * mask, atol=1e-7)


@pytest.mark.parametrize("body, status, code", [
    ({"model": "grf-32", "operator": {"kind": "identity"}}, 422, "no_examples"),
    ({"model": "nope", "operator": {"kind": "identity"}}, 404, "unknown_model"),
    ({"model": "toy-phantom-64", "operator": {"kind": "nope"}}, 404, "unknown_operator"),
    ({"model": "toy-phantom-64", "operator": {"kind": "blur"}}, 422, "invalid_operator"),
    ({"model": "toy-phantom-64", "operator": {"kind": "identity"}, "example": 100}, 422, "invalid_request"),
    ({"model": "toy-phantom-64", "operator": {"kind": "identity"}, "noise_sigma": -1}, 422, "invalid_request"),
    ([1, 2], 422, "invalid_request"),
])
def test_demo_errors_answer_in_the_api_shape(web, body, status, code):
    r = web.post("/web/demo", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_demo_needs_the_key_where_one_is_configured(make_client):
    c = make_client(api_keys=("k1",))
    body = {"model": "grf-32", "operator": {"kind": "identity"}}
    assert c.get("/").status_code == 200  # the page itself loads, to ask for the key
    assert c.post("/web/demo", json=body).status_code == 401
    assert c.post("/web/demo", json=body, headers={"X-API-Key": "k1"}).json()["error"]["code"] == "no_examples"
