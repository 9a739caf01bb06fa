"""Lab files in and out, without reading them: a file travels as its own bytes (API.md "Lab file
formats": ``{"nifti"|"dicom"|"tiff"|"png"|"npy": base64}``) and the server parses it, so the
client needs no nibabel, pydicom or tifffile. A folder of DICOM files is zipped on the way; a
result file is written as the server sends it (a ``.nii`` path gets the NIfTI un-gzipped).
"""
from __future__ import annotations

import base64
import gzip
import io
import zipfile
from pathlib import Path

#: File formats by name (longest suffix first): how a file is sent, and how a result is asked for.
SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".zip": "dicom", ".tiff": "tiff", ".tif": "tiff",
            ".npy": "npy", ".png": "png"}
#: The formats a result can be written in (API.md "Lab data": ``?format=``).
RESULT_FORMATS = ("nifti", "dicom", "tiff", "npy")


def file_format(path) -> str | None:
    """The format a file's name says (a folder: a DICOM series), or None."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def encode_path(path) -> dict:
    """A file as the API's encoding of it (``{"nifti"|"dicom"|"tiff"|"png"|"npy": base64}``); a
    folder of DICOM files is zipped on the way."""
    p = Path(path)
    kind = file_format(p)
    if kind is None:
        raise ValueError(f"{p}: not a .nii, .nii.gz, DICOM .zip or folder, .tif, .png or .npy file")
    if p.is_dir():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                zf.write(f, f.relative_to(p).as_posix())
        data = buf.getvalue()
    else:
        data = p.read_bytes()
    return {kind: base64.b64encode(data).decode("ascii")}


def is_path(value) -> bool:
    return isinstance(value, (str, Path))


def write_result_file(path, data: bytes) -> Path:
    """A result file as the server sent it (NIfTI gzipped), to ``path`` (``.nii``: uncompressed)."""
    p = Path(path)
    if p.name.lower().endswith(".nii") and data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    p.write_bytes(data)
    return p


def result_format(path) -> str:
    """The result format ``path``'s name asks for, or ValueError."""
    kind = file_format(path) if not Path(path).is_dir() else None
    if kind not in RESULT_FORMATS:
        raise ValueError(f"{path}: a result is written as .nii / .nii.gz, a DICOM .zip, .tif or .npy")
    return kind
