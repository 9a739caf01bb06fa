"""Multi-page TIFF in and out (tifffile): pages are slices.

In: a TIFF of one page is one image, read exactly as ``service.codecs.decode_tiff`` reads it;
with several pages (reduced-resolution pages left out), each page is one slice, all of one
size and sample type, read and scaled like that one image (8-bit / 255, 16-bit / 65535, float
as is): ``[D, H, W]`` or ``[D, C, H, W]``. The size is checked from the page headers before
any page is decoded.

Out: one page per slice, float32 (grayscale, RGB for three channels, else planar channels).
"""
from __future__ import annotations

import io
import math

import numpy as np

from ..codecs import CodecError, decode_tiff, tiff_image
from .volume import LabVolume

#: Most pages a TIFF stack may have.
MAX_PAGES = 4096


def _pages(tf, field: str, max_elements: int) -> list:
    """The full-resolution pages, checked for count, shape, type and size before decoding."""
    if len(tf.pages) > MAX_PAGES:
        raise CodecError(f"{field}: the TIFF has {len(tf.pages)} pages, over the limit of {MAX_PAGES}; send "
                         "fewer slices", 413, "array_too_large")
    pages = [p for p in tf.pages if not getattr(p, "is_reduced", False)]
    first = pages[0]
    if any(p.shape != first.shape or p.dtype != first.dtype for p in pages):
        raise CodecError(f"{field}: the TIFF's pages differ in size or sample type; send a stack of equal pages "
                         "(one slice per page)")
    dtype = np.dtype(first.dtype) if first.dtype is not None else np.dtype(object)
    if dtype.kind not in "biuf":
        raise CodecError(f"{field}: TIFF sample type {dtype} is not accepted; send 8-bit, 16-bit or float")
    count = len(pages) * math.prod(first.shape)
    if count > max_elements:
        raise CodecError(f"{field}: the TIFF's {len(pages)} pages of {list(first.shape)} hold {count} values, "
                         f"over the limit of {max_elements}; send a smaller stack", 413, "array_too_large")
    return pages


def decode_tiff_stack(data: bytes, field: str, max_elements: int) -> LabVolume:
    """A TIFF -> ``[D, H, W]`` or ``[D, C, H, W]`` (D = 1 for a single image)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            pages = _pages(tf, field, max_elements)
            if len(pages) > 1:
                planes = [tiff_image(p.asarray(), p.axes, tuple(getattr(p, "extrasamples", ()) or ()), field)
                          for p in pages]
    except CodecError:
        raise
    except Exception:  # noqa: BLE001 - tifffile raises many kinds on a bad file
        raise CodecError(f"{field}: not a valid TIFF image (corrupt or truncated); send a TIFF file, "
                         "base64") from None
    if len(pages) == 1:
        return LabVolume(decode_tiff(data, field, max_elements)[None], "tiff", {"pages": 1})
    return LabVolume(np.stack(planes), "tiff", {"pages": len(planes)})


def encode_tiff(volume: np.ndarray) -> bytes:
    """``[D, H, W]`` or ``[D, C, H, W]`` -> a TIFF of D float32 pages, one series (grayscale, RGB
    for three channels, else planar channels)."""
    import tifffile

    a = np.asarray(volume, dtype=np.float32)
    a = a[:, None] if a.ndim == 3 else a
    if a.shape[1] == 1:
        data, kw = a[:, 0], {"photometric": "minisblack"}
    elif a.shape[1] == 3:
        data, kw = np.moveaxis(a, 1, -1), {"photometric": "rgb"}
    else:
        data, kw = a, {"photometric": "minisblack", "planarconfig": "separate"}
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(data), **kw)
    return buf.getvalue()
