"""The image size of a request, told before any array is decoded, and whether the model takes it.

A card's ``sizes`` (API.md "Lab data"): ``{"native": [H, W], "any": true, "min": [h, w],
"multiple_of": k, "pass": "tiles" | "whole"}``. Without ``any`` the card's shape is the only
size. The size comes from the observation's shape (read from a list's nesting or an encoded
file's header, cheaply) through the operator kind's ``image_size``; where the kind cannot tell
(points, measurements), the model's native size is meant.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from typing import Any, Mapping

import numpy as np

from models.checkpoint import LoadedModel
from models.tiling import TiledDenoiser, tile_count

from .errors import ApiError
from .labfiles.peek import lab_shape

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"


def _list_shape(value: list) -> tuple[int, ...]:
    shape, v = [], value
    while isinstance(v, list):
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return tuple(shape)


def _bytes_shape(data: bytes) -> tuple[int, ...] | None:
    """The shape in a .npy header, or ``(H, W)`` of a PNG or TIFF image, without decoding it."""
    if data.startswith(_NPY_MAGIC):
        f = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])
    if data.startswith(_PNG_MAGIC) and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(h), int(w)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            return tuple(int(series.shape[series.axes.index(a)]) for a in "YX")
    return None


def observation_shape(value: Any, files: Mapping[str, bytes] | None) -> tuple[int, ...] | None:
    """The observation's shape as far as it can be read without decoding (None: unknown)."""
    try:
        if isinstance(value, list):
            return _list_shape(value)
        lab = lab_shape(value, files)  # NIfTI, DICOM: from their headers (service/labfiles/peek.py)
        if lab is not None:
            return lab
        if isinstance(value, dict) and len(value) == 1:
            key, v = next(iter(value.items()))
            if key == "file":
                return _bytes_shape((files or {})[v])
            head = v[: 4 * 128] if key == "npy" else v  # a .npy header fits its first 384 bytes
            return _bytes_shape(base64.b64decode(head + "=" * (-len(head) % 4)))
    except (KeyError, ValueError, TypeError, binascii.Error, struct.error, IndexError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a damaged file: the decoder answers it properly later
        return None
    return None


def _takes(card: dict, size: tuple[int, int]) -> str | None:
    """Why the card's model does not take images of ``size`` (None: it does)."""
    sizes = card.get("sizes") or {}
    native = tuple(int(s) for s in card["shape"][1:])
    if not sizes.get("any"):
        return f"model {card['id']} takes {native[0]} x {native[1]} images only"
    lo = tuple(int(s) for s in sizes.get("min", native))
    k = int(sizes.get("multiple_of", 1))
    if size[0] < lo[0] or size[1] < lo[1]:
        return f"model {card['id']} takes images of at least {lo[0]} x {lo[1]}"
    if size[0] % k or size[1] % k:
        return f"model {card['id']} takes images whose sides are multiples of {k}"
    return None


def request_shape(card: dict, cls, spec, obs: tuple[int, ...] | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the request's image: the size its observation implies under the operator,
    or the model's native size; 422 ``shape_mismatch`` when the model does not take it."""
    native = tuple(int(s) for s in card["shape"])
    size = cls.image_size(spec, obs) if obs is not None else None
    if size is None or tuple(size) == native[1:]:
        return native
    why = _takes(card, tuple(size))
    if why is not None:
        shape = "[" + ",".join(map(str, native)) + "]"
        raise ApiError(422, "shape_mismatch", f"observation: shape {list(obs)} under operator {cls.kind} means a "
                       f"{size[0]} x {size[1]} image, and {why} (its shape is {shape}); send an observation of a "
                       "size the model takes (GET /v1/models/{id}: shape, sizes)")
    return (native[0], int(size[0]), int(size[1]))


def pixels_per_pass(card: dict, shape: tuple[int, int, int]) -> int:
    """Values one network pass over an image of ``shape`` evaluates: the image itself, or the
    tiles that cover it (``models.tiling``) where the card runs larger images in tiles."""
    native = tuple(int(s) for s in card["shape"])
    if tuple(shape) == native or (card.get("sizes") or {}).get("pass") == "whole":
        return math.prod(shape)
    return native[0] * tile_count(shape[1:], native[1:]) * math.prod(native[1:])


def sized_model(model: LoadedModel, shape: tuple[int, int, int]) -> LoadedModel:
    """The model whose denoiser takes images of ``shape``: itself at its native size or where its
    card runs larger images whole (a fully convolutional network); else its tiles."""
    card = model.card
    if tuple(shape) == tuple(card["shape"]) or (card.get("sizes") or {}).get("pass") == "whole":
        return model
    return LoadedModel(card, TiledDenoiser(model.denoiser, shape))
