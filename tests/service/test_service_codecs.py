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


def raw_npy(shape: str, descr: str = "<f8", data: bytes = b"\0" * 800, version: int = 1) -> bytes:
    """A hand-made .npy: magic, version, header length, header dict text (any ``shape``), data."""
    hdr = ("{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)).encode("latin1")
    prefix = 6 + 2 + (2 if version == 1 else 4)
    hdr += b" " * (63 - (prefix + len(hdr)) % 64) + b"\n"  # padded to a multiple of 64, as numpy does
    return (b"\x93NUMPY" + bytes([version, 0]) + len(hdr).to_bytes(2 if version == 1 else 4, "little")
            + hdr + data)


def test_raw_npy_helper_matches_numpy():
    np.testing.assert_array_equal(dec({"file": "p"}, files={"p": raw_npy("(2, 3)", data=np.arange(6.0).tobytes())}),
                                  np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("shape", ["(-1, -1)", "(0, -1)", "(-1,)", "(-1, 100)", "(5, -2)", "(True,)",
                                   "(-100000000000,)"])
@pytest.mark.parametrize("version", [1, 2])
def test_npy_negative_or_non_integer_dimensions_are_422(shape, version):
    """numpy's header parser accepts negative dimensions: ``(-1,)`` would read "the rest of the
    data" past the element limit, ``(-1, -1)`` and ``(0, -1)`` crashed in reshape (a 500)."""
    for value, files in (({"file": "p"}, {"p": raw_npy(shape, version=version)}),
                         ({"npy": base64.b64encode(raw_npy(shape, version=version)).decode()}, None)):
        with pytest.raises(CodecError) as e:
            dec(value, files=files)
        assert e.value.status == 422 and e.value.code == "invalid_array"
        assert "non-negative" in str(e.value) and "send" in str(e.value)


@pytest.mark.parametrize("shape", [str((2**31 + 1,)), str((2**40, 0)), str((0, 2**63)), str((10**4000,)),
                                   str((2**31,) * 8), str((100, 101)), str((2**31, 2**31, 0)),
                                   str((100_000, 0)), str((0, 2**31 - 1, 2**31 - 1, 0))])
def test_npy_absurd_sizes_are_413_before_any_allocation(shape):
    """A dimension over 2**31 or a product over the limit (zeros counted as ones): 413, nothing
    read; a 4000-digit dimension never reaches int-to-str conversion in the message."""
    with pytest.raises(CodecError) as e:
        dec({"file": "p"}, files={"p": raw_npy(shape, data=b"")})
    assert e.value.status == 413 and e.value.code == "array_too_large"
    assert len(str(e.value)) < 400


def test_npy_zero_sized_and_scalar_arrays_still_decode():
    assert dec({"file": "p"}, files={"p": raw_npy("(0, 3)", data=b"")}).shape == (0, 3)
    assert dec({"file": "p"}, files={"p": raw_npy("()", data=np.float64(2.5).tobytes())}) == 2.5


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(w: int, h: int, color_type: int = 0, rows: bytes = b"", palette: bytes | None = None) -> bytes:
    """A hand-made 8-bit PNG whose IHDR states ``w`` x ``h`` whatever data follows."""
    import struct
    import zlib
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    if palette is not None:
        out += _png_chunk(b"PLTE", palette)
    return out + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h", [(2**31 - 1, 2**31 - 1), (100_000, 100_000), (12_000, 12_000), (101, 100)])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_with_huge_header_dimensions_is_413_unread(w, h):
    with pytest.raises(CodecError) as e:  # Pillow's own decompression-bomb guard included
        dec({"png": base64.b64encode(raw_png(w, h)).decode()})
    assert e.value.status == 413 and e.value.code == "array_too_large"


def test_png_palette_counts_its_rgb_output():
    """A palette image decodes to three channels: 80 x 80 x 3 = 19200 > 10000 elements."""
    data = raw_png(80, 80, color_type=3, rows=b"\0" * (81 * 80), palette=b"\0\0\0" * 256)
    with pytest.raises(CodecError) as e:
        dec({"file": "p"}, files={"p": data})
    assert e.value.status == 413
    small = raw_png(50, 50, color_type=3, rows=b"\0" * (51 * 50), palette=b"\0\0\0" * 256)
    assert dec({"file": "p"}, files={"p": small}).shape == (3, 50, 50)


def _tiff_with_size(width: int, length: int) -> bytes:
    """A tifffile-written 4 x 4 TIFF whose ImageWidth / ImageLength tags are rewritten."""
    import struct

    import tifffile
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((4, 4), np.uint8))
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tf:
        tags = tf.pages[0].tags
        offsets = {name: tags[name].offset for name in ("ImageWidth", "ImageLength")}
    struct.pack_into("<I", data, offsets["ImageWidth"] + 8, width)  # tag, type, count, then the value
    struct.pack_into("<I", data, offsets["ImageLength"] + 8, length)
    return bytes(data)


@pytest.mark.parametrize("w,h", [(2**32 - 1, 2**32 - 1), (2**31, 4), (200, 200)])
def test_tiff_with_huge_header_dimensions_is_413_before_decoding(w, h, monkeypatch):
    import tifffile

    def no_decoding(*a, **kw):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_decoding)
    with pytest.raises(CodecError) as e:
        dec({"tiff": base64.b64encode(_tiff_with_size(w, h)).decode()})
    assert e.value.status == 413 and e.value.code == "array_too_large"


def test_tiff_with_zero_dimension_is_422():
    for w, h in ((0, 4), (2**32 - 1, 0)):
        with pytest.raises(CodecError) as e:
            dec({"file": "p"}, files={"p": _tiff_with_size(w, h)})
        assert e.value.status == 422


# ----------------------------------------------------------------------------- alpha, colour, integer .npy
def _png_bytes(arr, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_alpha_is_dropped_when_opaque_and_refused_otherwise():
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    out = dec({"file": "p"}, files={"p": _png_bytes(rgba, "RGBA")})
    assert out.shape == (3, 4, 5) and np.allclose(out[0], 200 / 255) and out[1:].max() == 0
    la = np.full((4, 5, 2), 255, dtype=np.uint8)
    assert dec({"file": "p"}, files={"p": _png_bytes(la, "LA")}).shape == (4, 5)
    rgba[1, 2, 3] = 128
    with pytest.raises(CodecError, match="1 transparent or translucent pixels.*opaque") as e:
        dec({"file": "p"}, files={"p": _png_bytes(rgba, "RGBA")})
    assert e.value.status == 422
    # a palette with a transparent entry, and a colour-key (tRNS) grayscale image
    pal = Image.fromarray(np.array([[0, 1], [1, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0])
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    with pytest.raises(CodecError, match="transparent"):
        dec({"file": "p"}, files={"p": buf.getvalue()})
    with pytest.raises(CodecError, match="transparent"):
        dec({"file": "p"}, files={"p": _png_bytes(np.array([[0, 7]], dtype=np.uint8), "L", transparency=7)})


def test_tiff_rgb_and_alpha():
    import tifffile

    rgba = np.zeros((4, 5, 4), dtype=np.uint16)
    rgba[..., 2], rgba[..., 3] = 65535, 65535
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgba, photometric="rgb", extrasamples=["unassalpha"])
    out = dec({"tiff": base64.b64encode(buf.getvalue()).decode()})
    assert out.shape == (3, 4, 5) and out[2].min() == 1.0 and out[:2].max() == 0.0
    rgba[0, 0, 3] = 0
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgba, photometric="rgb", extrasamples=["assocalpha"])
    with pytest.raises(CodecError, match="TIFF has an alpha channel"):
        dec({"tiff": base64.b64encode(buf.getvalue()).decode()})


def test_integer_npy_is_scaled_like_a_png_only_when_asked():
    """``scale_integers`` (the service sets it for image models): uint8 /255, uint16 /65535 (any
    byte order); other dtypes and JSON lists as is. Without it every dtype is taken as is."""
    u8 = np.array([[0, 51, 255]], dtype=np.uint8)
    u16 = np.array([[0, 65535]], dtype=">u2")
    i32 = np.array([[0, 255]], dtype=np.int32)

    def scaled(a, **kw):
        return decode_array({"npy": base64.b64encode(npy(a)).decode()}, "x", max_elements=LIMIT, **kw)[0]
    np.testing.assert_allclose(scaled(u8, scale_integers=True), [[0, 0.2, 1.0]])
    np.testing.assert_allclose(scaled(u16, scale_integers=True), [[0, 1.0]])
    np.testing.assert_array_equal(scaled(i32, scale_integers=True), [[0, 255]])
    np.testing.assert_array_equal(scaled(u8), [[0, 51, 255]])
    out = decode_array({"file": "p"}, "x", max_elements=LIMIT, files={"p": npy(u8)}, scale_integers=True)[0]
    np.testing.assert_allclose(out, [[0, 0.2, 1.0]])
    png = decode_array({"png": base64.b64encode(_png_bytes(u8)).decode()}, "x", max_elements=LIMIT)[0]
    np.testing.assert_array_equal(png, scaled(u8, scale_integers=True))  # the same numbers as a PNG
