"""Arrays in and out of the API (API.md "Arrays"), and strict JSON.

Decoding never trusts the input: a ``.npy`` header is parsed and checked (numeric or bool
dtype, element count within the limit, enough bytes) before any data is read, and never
with pickle; images are checked for size before their pixels are decoded; NaN and inf are
rejected everywhere, including JSON's non-standard ``NaN`` / ``Infinity`` literals.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any, Mapping

import numpy as np
# The plain .npy encoding on the wire, shared with the light client (its from_encoded,
# to_npy_field and walk_arrays are re-exported for the code that imports them from here).
from reconserve_client.arrays import from_encoded, npy_bytes, to_npy_field, walk_arrays  # noqa: F401

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_DIMS = 8
#: Largest single dimension an array header may state (larger is refused with 413 unread).
MAX_DIM = 2**31


class CodecError(ValueError):
    """An array or body that cannot be accepted; ``status`` is 422 (invalid) or 413 (too large)."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_array"):
        super().__init__(message)
        self.status, self.code = status, code


def _too_large(field: str, n: int, limit: int) -> CodecError:
    return CodecError(f"{field}: {n} elements is over the limit of {limit}; send a smaller array",
                      413, "array_too_large")


# ----------------------------------------------------------------------------- JSON
def _reject_constant(name: str):
    raise CodecError(f"the body contains the JSON literal {name}; send finite numbers only "
                     "(NaN and infinities are not valid JSON)", 422, "invalid_json")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise CodecError("the body contains a number too large for a float; send finite numbers only",
                         422, "invalid_json")
    return v


def loads_strict(data: bytes | str) -> Any:
    """``json.loads`` that rejects NaN / Infinity literals and overflowing numbers with 422."""
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except CodecError:
        raise
    except RecursionError:
        raise CodecError("the body is nested too deeply; send at most a few levels of nesting",
                         422, "invalid_json") from None
    except UnicodeDecodeError:
        raise CodecError("the body is not UTF-8 text; send JSON encoded as UTF-8", 422, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, int too long
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CodecError(f"the body is not valid JSON{where}; send a JSON object as in API.md",
                         422, "invalid_json") from None


# ----------------------------------------------------------------------------- decoding
def _b64(text: Any, field: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise CodecError(f"{field}: {what} must be a base64 string, got {type(text).__name__}; "
                         f'send {{"{what}": "<base64>"}}')
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CodecError(f"{field}: {what} is not valid base64; send standard base64 "
                         "(A-Z a-z 0-9 + /, padded with =)") from None


def _finish(arr: np.ndarray, field: str) -> np.ndarray:
    """Numeric/bool -> float64, finite only."""
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.dtype.kind not in "iuf":
        raise CodecError(f"{field}: dtype {arr.dtype.str} is not numeric; send integers, floats or bools")
    out = np.array(arr, dtype=np.float64)  # a writable copy
    if not np.isfinite(out).all():
        raise CodecError(f"{field}: contains NaN or inf; send finite numbers only")
    return out


def _checked_count(shape: tuple, field: str, max_elements: int) -> int:
    """Elements of an announced ``shape``, refused before anything is allocated: a dimension that
    is not a plain non-negative int is 422 (numpy would read ``-1`` as "the rest of the data"),
    one over ``MAX_DIM``, or a product (zeros counted as ones) over ``max_elements``, is 413."""
    for d in shape:
        if type(d) is not int or d < 0:
            raise CodecError(f"{field}: the .npy header states the shape {_short(shape)}, with a "
                             "dimension that is not a non-negative integer; send the bytes numpy.save "
                             "writes for a real array")
    for d in shape:
        if d > MAX_DIM:
            raise CodecError(f"{field}: the .npy header states a dimension over {MAX_DIM} in the shape "
                             f"{_short(shape)}; send a smaller array (at most {max_elements} elements)",
                             413, "array_too_large")
    # At most MAX_DIMS factors of at most 2**31: an exact Python int. Zeros count as ones, so an
    # empty array cannot announce a shape numpy itself refuses ((2**31, 2**31, 0) fails reshape).
    extent = math.prod(max(d, 1) for d in shape)
    if extent > max_elements:
        raise _too_large(field, extent, max_elements)
    return math.prod(shape)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "<a shape too long to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def decode_npy(data: bytes, field: str, max_elements: int, scale_integers: bool = False) -> np.ndarray:
    """A ``.npy`` file: header checked first, then exactly the data it announces.

    ``scale_integers`` (image models): ``uint8`` and ``uint16`` arrays are pixel values and are
    scaled exactly like a PNG's samples (/255, /65535) into [0, 1]; other dtypes are taken as is.
    """
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
        else:
            raise ValueError
    except Exception:
        raise CodecError(f"{field}: not a valid .npy file; send the bytes numpy.save writes") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise CodecError(f"{field}: .npy dtype {dtype.str} is not accepted; send a numeric or bool "
                         "array (never object or structured dtypes)")
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{field}: {len(shape)} dimensions; send at most {MAX_DIMS}")
    count = _checked_count(shape, field, max_elements)
    need = count * dtype.itemsize
    body = data[f.tell():]
    if len(body) < need:
        raise CodecError(f"{field}: the .npy header announces {need} bytes of data, the file has "
                         f"{len(body)}; send the complete file")
    arr = np.frombuffer(body, dtype=dtype, count=count)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if scale_integers and arr.dtype.kind == "u" and arr.dtype.itemsize in (1, 2):
        return _image_scale(arr.astype(arr.dtype.newbyteorder("=")), field)
    return _finish(arr, field)


def _image_scale(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float64) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.dtype.kind == "f":
        return _finish(arr, field)
    raise CodecError(f"{field}: image sample type {arr.dtype} is not accepted; send 8-bit, 16-bit or "
                     "floating-point images")


_TRANSPARENT = ("{field}: the {what} has an alpha channel with {n} transparent or translucent pixels; their "
                "colour is not an observation: send an opaque image (flatten it onto a background), and to "
                "leave pixels out use the inpainting operator with those pixels 0 in operator.mask")


def decode_png(data: bytes, field: str, max_elements: int) -> np.ndarray:
    """PNG -> ``[H, W]`` (grayscale) or ``[3, H, W]`` (RGB), 8-bit /255, 16-bit /65535 (Pillow
    reads 16-bit colour PNGs at 8 bits per sample). An alpha channel (RGBA, LA, a palette or
    colour-key transparency) is dropped when every pixel is opaque and refused otherwise."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError:  # Pillow's own guard: a header announcing >178M pixels
        raise CodecError(f"{field}: the PNG header announces an image far over the limit of "
                         f"{max_elements} elements; send a smaller image", 413, "array_too_large") from None
    except Exception:
        raise CodecError(f"{field}: not a valid PNG image; send a PNG file, base64") from None
    w, h = im.size
    bands = 3 if im.mode == "P" else len(im.getbands())  # a palette image becomes RGB below
    if w * h * bands > max_elements:
        raise _too_large(field, w * h * bands, max_elements)
    try:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("L", "RGB") and "transparency" in im.info:
            im = im.convert("LA" if im.mode == "L" else "RGBA")  # a tRNS colour key: transparent pixels
        if im.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
            alpha = np.asarray(im.getchannel("A"))
            if alpha.size and int(alpha.min()) < 255:
                raise CodecError(_TRANSPARENT.format(field=field, n=int((alpha < 255).sum()), what="PNG"))
            im = im.convert("L" if im.mode in ("LA", "La") else "RGB")  # opaque: the alpha carries nothing
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.asarray(im, dtype=np.int64)
            arr = arr.clip(0, 65535).astype(np.uint16)  # PNG holds at most 16 bits per sample
        elif im.mode == "1":
            arr = np.asarray(im, dtype=bool)
        elif im.mode in ("L", "RGB"):
            arr = np.asarray(im, dtype=np.uint8)
        else:
            raise ValueError
    except CodecError:
        raise
    except Exception:
        raise CodecError(f"{field}: PNG mode not supported or data corrupt; send 8-bit or 16-bit "
                         "grayscale or RGB") from None
    if arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    return _image_scale(arr, field)


def decode_tiff(data: bytes, field: str, max_elements: int) -> np.ndarray:
    """TIFF -> ``[H, W]`` or ``[C, H, W]``: 8-bit /255, 16-bit /65535, float as is. An alpha sample
    (extra sample typed associated or unassociated alpha) is dropped when opaque, refused otherwise."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            series = tf.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
            count = math.prod(shape)
            if count > max_elements:
                raise _too_large(field, count, max_elements)
            if dtype.kind not in "biuf" or dtype.hasobject:
                raise CodecError(f"{field}: TIFF sample type {dtype} is not accepted; send 8-bit, "
                                 "16-bit or float")
            arr = series.asarray()
            extras = tuple(getattr(tf.pages[0], "extrasamples", ()) or ())
    except CodecError:
        raise
    except Exception:
        raise CodecError(f"{field}: not a valid TIFF image; send a TIFF file, base64") from None
    return tiff_image(arr, axes, extras, field)


def tiff_image(arr, axes: str, extras: tuple, field: str) -> np.ndarray:
    """One TIFF image's samples (``axes`` as tifffile names them) -> ``[H, W]`` or ``[C, H, W]``,
    scaled like a PNG's; an alpha extra sample dropped when opaque, refused otherwise."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and axes.endswith("S"):  # samples (color) last -> channels first
        arr = np.moveaxis(arr, -1, 0)
        # extra samples typed 1 (associated) or 2 (unassociated alpha) come last: dropped when
        # opaque, refused otherwise (as in PNG); unspecified extra samples (0) stay channels
        if extras and extras[-1] in (1, 2) and arr.shape[0] > len(extras):
            alpha = arr[-1]
            full = 1.0 if arr.dtype.kind == "f" else (True if arr.dtype == bool else np.iinfo(arr.dtype).max)
            if alpha.size and (alpha < full).any():
                raise CodecError(_TRANSPARENT.format(field=field, n=int((alpha < full).sum()), what="TIFF"))
            arr = arr[:-1]
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim > 3:
        raise CodecError(f"{field}: TIFF with {arr.ndim} dimensions; send one image "
                         "(grayscale or multi-channel)")
    return _image_scale(arr, field)


def decode_bytes(data: bytes, field: str, max_elements: int, scale_integers: bool = False) -> np.ndarray:
    """A file of unknown type: told apart by content (.npy, PNG, TIFF)."""
    if data.startswith(NPY_MAGIC):
        return decode_npy(data, field, max_elements, scale_integers)
    if data.startswith(PNG_MAGIC):
        return decode_png(data, field, max_elements)
    if data.startswith(TIFF_MAGICS):
        return decode_tiff(data, field, max_elements)
    raise CodecError(f"{field}: file is neither .npy, PNG nor TIFF; send one of those")


def decode_list(value: list, field: str, max_elements: int) -> np.ndarray:
    """A nested JSON list of numbers (or bools)."""
    try:
        arr = np.array(value)
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise CodecError(f"{field}: is not a rectangular array of numbers; send a nested list with "
                         "equal-length rows") from None
    if arr.size > max_elements:
        raise _too_large(field, arr.size, max_elements)
    if arr.ndim > MAX_DIMS:
        raise CodecError(f"{field}: {arr.ndim} dimensions; send at most {MAX_DIMS}")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CodecError(f"{field}: has entries that are not numbers; send a nested list of numbers")
    return _finish(arr, field)


ENCODINGS = ("npy", "png", "tiff", "file")


def is_encoded(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) >= 1 and any(k in value for k in ENCODINGS)


def decode_array(value: Any, field: str, *, max_elements: int,
                 files: Mapping[str, bytes] | None = None, scale_integers: bool = False) -> tuple[np.ndarray, bool]:
    """An array in any accepted form -> ``(float64 array, came_from_an_image)``.

    ``scale_integers``: a ``uint8`` / ``uint16`` ``.npy`` is read like an image (/255, /65535);
    the service sets it for the observation of an image model (API.md "Arrays")."""
    if isinstance(value, np.ndarray):
        return decode_list(value.tolist(), field, max_elements), False
    if isinstance(value, list):
        return decode_list(value, field, max_elements), False
    if isinstance(value, Mapping):
        keys = [k for k in value if k in ENCODINGS]
        extra = sorted(set(value) - set(ENCODINGS))
        if len(keys) != 1 or extra:
            raise CodecError(f"{field}: an array object must have exactly one of the keys "
                             f"{list(ENCODINGS)}; send e.g. {{\"npy\": \"<base64>\"}}")
        key = keys[0]
        if key == "file":
            name = value["file"]
            if not isinstance(name, str) or files is None or name not in files:
                raise CodecError(f"{field}: refers to a file part that the request does not have; "
                                 "send a multipart request with a file part of that name")
            data = files[name]
            return decode_bytes(data, field, max_elements, scale_integers), not data.startswith(NPY_MAGIC)
        data = _b64(value[key], field, key)
        if key == "npy":
            return decode_npy(data, field, max_elements, scale_integers), False
        if key == "png":
            return decode_png(data, field, max_elements), True
        return decode_tiff(data, field, max_elements), True
    raise CodecError(f"{field}: expected an array, got {type(value).__name__}; send a nested list of "
                     'numbers or {"npy": "<base64>"}')


# ----------------------------------------------------------------------------- encoding
def encode_array(arr: np.ndarray, dtype=np.float32) -> dict:
    """``{"npy": base64, "shape": [...], "dtype": "float32"}``."""
    a = np.ascontiguousarray(np.asarray(arr, dtype=dtype))
    return {"npy": base64.b64encode(npy_bytes(a)).decode("ascii"), "shape": list(a.shape),
            "dtype": a.dtype.name}
