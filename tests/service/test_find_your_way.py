"""Finding one's way (issue 20 item 4): every method parameter described with its meaning, unit and
range, a card's tuned values beside the generic defaults, and requests counted by route and status."""
import re

from guidance.registry import METHODS
from models.checkpoint import LoadedModel
from tests.helpers.service import MODELS


def test_every_parameter_is_described_as_its_request_schema_bounds_it(client):
    methods = {m["name"]: m for m in client.get("/v1/methods").json()["methods"]}
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(methods) == set(METHODS)
    for name, m in methods.items():
        info = m["parameter_info"]
        assert set(info) == set(m["parameters"]) and "tuned" not in m
        schema = schemas["".join(p.capitalize() for p in name.split("_")) + "Method"]["properties"]
        for p, i in info.items():
            assert i["meaning"] and i["default"] == m["parameters"][p], (name, p)
            prop = schema[p].get("anyOf", [schema[p]])[0]
            assert i.get("minimum") == prop.get("minimum") and i.get("maximum") == prop.get("maximum"), (name, p)
            assert i.get("exclusive_minimum") == prop.get("exclusiveMinimum"), (name, p)
            assert i.get("choices") == prop.get("enum"), (name, p)
    assert methods["fast"]["parameter_info"]["zeta_obs"]["per_channel"] is True
    assert methods["fast"]["parameter_info"]["noise_floor"]["unit"] == "the observation's units"
    cg = methods["fast"]["parameter_info"]["cg_iters"]
    assert (cg["minimum"], cg["maximum"], cg["default"]) == (0, 50, 1)


def test_a_cards_tuned_values_stand_beside_the_defaults(make_client):
    toy = MODELS["grf-32"]
    card = dict(toy.card, id="tuned", methods=[{"name": "fast", "steps": 50, "cg_iters": 8}])
    c = make_client(models={"tuned": LoadedModel(card, toy.denoiser)})
    methods = {m["name"]: m for m in c.get("/v1/methods", params={"model": "tuned"}).json()["methods"]}
    assert methods["fast"]["tuned"] == {"steps": 50, "cg_iters": 8}
    assert methods["fast"]["parameters"]["steps"] == 30  # the generic default, beside it
    assert methods["dps"]["tuned"] is None  # not recommended by this card
    r = c.get("/v1/methods", params={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"


def counts(client) -> dict:
    text = client.get("/metrics").text
    pat = re.compile(r'reconserve_http_requests_total\{method="(\w+)",route="([^"]+)",status="(\d+)"\} ([\d.]+)')
    return {(m, r, int(s)): float(v) for m, r, s, v in pat.findall(text)}


def test_requests_are_counted_by_route_template_and_status(client):
    for _ in range(3):
        client.post("/v1/jobs", json={"model": "grf-32"})  # 422
    client.get("/v1/jobs/not-a-job")  # 404, counted under the template, never the id
    client.get("/no/such/path")
    c = counts(client)
    assert c[("POST", "/v1/jobs", 422)] == 3
    assert c[("GET", "/v1/jobs/{job_id}", 404)] == 1
    assert c[("GET", "unmatched", 404)] == 1
    assert not any("not-a-job" in r for _, r, _ in c)
