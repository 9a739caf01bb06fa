"""Images of any size from a fixed-size prior (issue 19 item 1): the size read before decoding,
the operator kinds' own rule for it, the card's limits, the admission cost in tiles, and a
larger image reconstructed over HTTP."""
import base64
import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from models.checkpoint import load_models
from operators.spec import OPERATORS
from service.sizes import observation_shape, pixels_per_pass, request_shape
from service.errors import ApiError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy(a) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return b64(buf.getvalue())


def png(a) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return b64(buf.getvalue())


def tiff(a) -> str:
    buf = io.BytesIO()
    tifffile.imwrite(buf, a)
    return b64(buf.getvalue())


def test_the_observation_shape_is_read_without_decoding():
    a = np.zeros((3, 40, 50), np.float32)
    assert observation_shape(a.tolist(), None) == (3, 40, 50)
    assert observation_shape({"npy": npy(a)}, None) == (3, 40, 50)
    assert observation_shape({"png": png(np.zeros((40, 50), np.uint8))}, None) == (40, 50)
    assert observation_shape({"png": png(np.zeros((40, 50, 3), np.uint8))}, None) == (40, 50)
    assert observation_shape({"tiff": tiff(np.zeros((40, 50), np.uint16))}, None) == (40, 50)
    raw = io.BytesIO()
    np.save(raw, a)
    assert observation_shape({"file": "obs"}, {"obs": raw.getvalue()}) == (3, 40, 50)
    for bad in ({"npy": "!!!"}, {"png": b64(b"\x89PNG\r\n\x1a\n")}, {"file": "missing"}, "x", None):
        assert observation_shape(bad, {}) is None  # the decoder answers these properly later


@pytest.mark.parametrize("spec,obs,size", [
    ({"kind": "identity"}, (1, 100, 80), (100, 80)),
    ({"kind": "inpainting", "mask": [[1.0]]}, (100, 80), (100, 80)),
    ({"kind": "blur", "gaussian": {"sigma": 1.0}}, (1, 96, 96), (96, 96)),
    ({"kind": "super_resolution", "factor": 4}, (1, 32, 48), (128, 192)),
    ({"kind": "mri", "mask": [[1.0]]}, (2, 70, 70), (70, 70)),
    ({"kind": "ct", "angles": 8}, (1, 8, 182), (128, 128)),  # ceil(sqrt(2) 128) = 182 native cells
    ({"kind": "ct", "angles": 8, "detectors": 100}, (1, 8, 100), None),  # cells set: the size is not told
    ({"kind": "sparse_points", "points": [[0, 1, 2]]}, (1,), None),
    ({"kind": "compressed_sensing", "m": 10}, (10,), None),
])
def test_each_kind_says_what_size_its_observation_means(spec, obs, size):
    cls = OPERATORS[spec["kind"]]
    assert cls.image_size(cls.Spec.parse(spec), obs) == size


@pytest.fixture(scope="module")
def cards():
    return {k: m.card for k, m in load_models().items()}


def test_the_card_decides_which_sizes_it_takes(cards):
    phantom, darcy, inp = cards["phantom-64"], cards["darcy-64"], OPERATORS["identity"]
    spec = inp.Spec.parse({"kind": "identity"})
    assert request_shape(phantom, inp, spec, (1, 64, 64)) == (1, 64, 64)
    assert request_shape(phantom, inp, spec, None) == (1, 64, 64)  # not told: the native size
    assert request_shape(phantom, inp, spec, (1, 200, 130)) == (1, 200, 130)
    for card, obs, why in ((phantom, (1, 40, 200), "at least 64 x 64"), (darcy, (2, 128, 128), "64 x 64 images only")):
        with pytest.raises(ApiError) as e:
            request_shape(card, inp, spec, obs)
        assert e.value.status == 422 and e.value.code == "shape_mismatch" and why in e.value.message


def test_the_admission_cost_counts_tiles(cards):
    phantom = cards["phantom-64"]
    assert pixels_per_pass(phantom, (1, 64, 64)) == 64 * 64
    assert pixels_per_pass(phantom, (1, 256, 256)) == 25 * 64 * 64  # a shifted 5 x 5 grid at most
    assert pixels_per_pass(dict(phantom, sizes=dict(phantom["sizes"], **{"pass": "whole"})), (1, 256, 256)) == 256 ** 2


def test_a_larger_image_over_http(make_client, cards):
    """A 512 x 512 PNG on phantom-64 (native 64 x 64), denoising in two steps: the result has the
    observation's size; the same request for the 64 x 64 PDE prior is refused with the sizes it takes."""
    c = make_client(models=load_models())
    rng = np.random.default_rng(0)
    img = (rng.random((512, 512)) * 255).astype(np.uint8)
    r = c.post("/v1/reconstruct", json={"model": "phantom-64", "operator": {"kind": "identity"},
                                        "observation": {"png": png(img)}, "noise_sigma": 0.1,
                                        "method": {"name": "fast", "steps": 2, "cg_iters": 0}})
    assert r.status_code == 200, r.text
    mean = np.load(io.BytesIO(base64.b64decode(r.json()["mean"]["npy"])))
    assert mean.shape == (1, 512, 512) and np.isfinite(mean).all()
    r = c.post("/v1/jobs", json={"model": "darcy-64", "operator": {"kind": "identity"},
                                 "observation": np.zeros((2, 96, 96)).tolist()})
    assert r.status_code == 422 and r.json()["error"]["code"] == "shape_mismatch"
