"""Array codecs: header-first .npy parsing, image scaling, strict JSON, encoding round trip."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.codecs import CodecError, decode_array, encode_array, from_encoded, loads_strict

LIMIT = 10_000


def npy(arr, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def dec(value, files=None):
    return decode_array(value, "x", max_elements=LIMIT, files=files)[0]


def test_npy_dtypes_and_layouts():
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.testing.assert_array_equal(dec({"npy": base64.b64encode(npy(a)).decode()}), a)
    f = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(dec({"npy": base64.b64encode(npy(f)).decode()}), f)
    b = np.array([True, False])
    out = dec({"npy": base64.b64encode(npy(b)).decode()})
    assert out.dtype == np.float64 and out.tolist() == [1.0, 0.0]
    out = dec({"file": "p"}, files={"p": npy(np.ones((2, 2), dtype=">f4"))})  # big-endian
    np.testing.assert_array_equal(out, np.ones((2, 2)))


def test_npy_header_is_checked_before_the_data():
    hdr = io.BytesIO()
    np.lib.format.write_array_header_2_0(hdr, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    with pytest.raises(CodecError) as e:
        dec({"file": "p"}, files={"p": hdr.getvalue()})
    assert e.value.status == 413
    with pytest.raises(CodecError) as e:
        dec({"file": "p"}, files={"p": npy(np.zeros(10))[:-8]})
    assert e.value.status == 422 and "announces" in str(e.value)
    with pytest.raises(CodecError, match="not accepted"):
        dec({"file": "p"}, files={"p": npy(np.array([object()]), allow_pickle=True)})


def test_images():
    img16 = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(img16).save(buf, format="PNG")
    out = dec({"png": base64.b64encode(buf.getvalue()).decode()})
    np.testing.assert_allclose(out, img16 / 65535.0)
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    out = dec({"file": "img"}, files={"img": buf.getvalue()})
    assert out.shape == (3, 4, 5) and out[1].min() == 1.0 and out[0].max() == 0.0
    with pytest.raises(CodecError, match="neither"):
        dec({"file": "img"}, files={"img": b"GIF89a..."})


def test_strict_json():
    assert loads_strict(b'{"a": [1, 2.5, true]}') == {"a": [1, 2.5, True]}
    for raw in (b'{"a": NaN}', b'[Infinity]', b'[-Infinity]', b"[1e400]", b"{", b"[" * 50000):
        with pytest.raises(CodecError):
            loads_strict(raw)


def test_encode_round_trip():
    a = np.random.default_rng(0).standard_normal((2, 3, 4))
    enc = encode_array(a)
    assert enc["shape"] == [2, 3, 4] and enc["dtype"] == "float32"
    np.testing.assert_array_equal(from_encoded(enc), a.astype(np.float32))


def test_schemas_and_codecs_import_no_torch():
    import subprocess
    import sys
    code = ("import sys, service.schemas, service.codecs, service.settings, service.errors; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])
