"""Any array of a request, lab files included: which decoder reads it, and what it keeps.

``{"nifti": b64}``, ``{"dicom": b64 of a zip}`` and ``{"tiff": b64}`` (pages are slices) are
read here (``{"dicom": ...}`` may also be one DICOM file); in multipart requests a
``{"file": part}`` is told apart by content (gzip or a NIfTI header: NIfTI; a zip or a DICOM
file: DICOM; TIFF's magic: TIFF). Everything else is
``service.codecs.decode_array``'s. A lab file gives its slices and its source (format and
header); a single slice is the 2-D image itself.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .. import codecs
from ..codecs import CodecError, decode_array
from .dicom import decode_dicom_zip, is_dicom_file
from .limits import GZIP_MAGIC, ZIP_MAGIC
from .nifti import decode_nifti
from .tiff import decode_tiff_stack
from .volume import LabVolume

#: The lab file encodings, beside ``service.codecs.ENCODINGS``.
LAB_ENCODINGS = ("nifti", "dicom")
#: Every key an encoded array may have.
ENCODINGS = tuple(codecs.ENCODINGS[:-1]) + LAB_ENCODINGS + ("file",)
DECODERS = {"nifti": decode_nifti, "dicom": decode_dicom_zip, "tiff": decode_tiff_stack}


@dataclass
class Decoded:
    """``array``: the 2-D path's array, or ``[D, ...]`` slices first when ``slices > 1``;
    ``source``: a lab file's format and header (None for other encodings)."""

    array: np.ndarray
    from_image: bool
    source: dict | None = None
    slices: int = 1


def sniff(data: bytes) -> str | None:
    """The lab format of a file part by its content, or None (left to ``decode_bytes``)."""
    if data.startswith(GZIP_MAGIC):
        return "nifti"
    if data.startswith(ZIP_MAGIC) or is_dicom_file(data):
        return "dicom"
    if data.startswith(codecs.TIFF_MAGICS):
        return "tiff"
    if len(data) >= 4 and {struct.unpack("<i", data[:4])[0], struct.unpack(">i", data[:4])[0]} & {348, 540}:
        return "nifti"
    return None


def _lab_file(value: Mapping, field: str, files: Mapping[str, bytes] | None) -> tuple[str, bytes] | None:
    """``(format, bytes)`` when ``value`` holds a lab file, else None."""
    keys = [k for k in value if k in ENCODINGS]
    if len(keys) != 1 or len(value) != 1:
        if any(k in value for k in LAB_ENCODINGS):
            raise CodecError(f"{field}: an array object must have exactly one of the keys {list(ENCODINGS)}; "
                             'send e.g. {"nifti": "<base64>"}')
        return None
    key = keys[0]
    if key == "file":
        name = value["file"]
        data = files.get(name) if isinstance(name, str) and files is not None else None
        kind = sniff(data) if data is not None else None
        return (kind, data) if kind is not None else None
    if key in DECODERS:
        return key, codecs._b64(value[key], field, key)
    return None


def _from_volume(vol: LabVolume) -> Decoded:
    array = vol.array[0] if vol.slices == 1 else vol.array
    return Decoded(array, vol.format == "tiff" and vol.slices == 1, vol.source(), vol.slices)  # pages: slices, not colours


def decode_any(value: Any, field: str, *, max_elements: int, files: Mapping[str, bytes] | None = None,
               scale_integers: bool = False) -> Decoded:
    """An array in any accepted form (API.md "Arrays" and "Lab data")."""
    lab = _lab_file(value, field, files) if isinstance(value, Mapping) else None
    if lab is not None:
        vol = DECODERS[lab[0]](lab[1], field, max_elements)
        if vol.array.size == 0:
            raise CodecError(f"{field}: the {lab[0]} file holds an empty image (shape {list(vol.array.shape)}); "
                             "send an image with pixels")
        return _from_volume(vol)
    array, from_image = decode_array(value, field, max_elements=max_elements, files=files,
                                     scale_integers=scale_integers)
    return Decoded(array, from_image)
