"""NIfTI-1 and NIfTI-2 single files (``.nii``, ``.nii.gz``) in and out (nibabel).

In: the header is inflated and checked first (its magic, a 3-D shape within the size limits,
no time axis, a numeric data type); then exactly the bytes it announces are inflated, and a
stream going on past them is refused. Voxel values get the header's ``scl_slope`` and
``scl_inter``. NIfTI's axes x, y, z become W, H, D: the array is ``data[x, y, z]`` transposed to
``[D, H, W]``.

Out: the result in the input's header (affine, units, description, extensions), float32,
unscaled; from a DICOM series, a header in the series' geometry; otherwise an identity affine.
"""
from __future__ import annotations

import io
import math
import struct

import numpy as np

from ..codecs import CodecError
from .limits import GZIP_MAGIC, GzipReader, bomb, ends_within, read_bounded
from .volume import LabVolume

#: Most bytes of header and extensions kept (and inflated before the data).
MAX_HEADER_BYTES = 1 << 20
#: Bytes a stream may go on after the voxel data (zero padding) before it is refused.
TRAILING_SLACK = 1 << 16
SIZES = {348: "Nifti1", 540: "Nifti2"}


def _classes(kind: str):
    import nibabel as nib
    return getattr(nib, f"{kind}Header"), getattr(nib, f"{kind}Image")


def _kind(head: bytes, field: str) -> str:
    """``Nifti1`` or ``Nifti2`` from ``sizeof_hdr`` (either byte order), else 422."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size in SIZES:
            return SIZES[size]
    raise CodecError(f"{field}: not a NIfTI file (its first bytes are not a NIfTI-1 or NIfTI-2 header); send "
                     'a single-file .nii or .nii.gz as {"nifti": "<base64>"}')


def _header(kind: str, head: bytes, field: str):
    klass, _ = _classes(kind)
    try:
        hdr = klass.from_fileobj(io.BytesIO(head), check=True)
    except Exception:  # noqa: BLE001 - nibabel raises several kinds on a bad header
        raise CodecError(f"{field}: the NIfTI header is invalid or truncated; send the .nii or .nii.gz "
                         "file as written") from None
    magic = bytes(hdr["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise CodecError(f"{field}: a NIfTI header of an .hdr/.img pair; send one single-file .nii or .nii.gz")
    return hdr


def _check(hdr, field: str, max_elements: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape (x, y, z), dtype, data offset)`` from the header, refused before any data is read."""
    shape = tuple(int(d) for d in hdr.get_data_shape())
    if any(d < 1 for d in shape):
        raise CodecError(f"{field}: the NIfTI header states the shape {list(shape)}; send a volume with "
                         "positive dimensions")
    if any(d > 1 for d in shape[3:]):
        raise CodecError(f"{field}: a {len(shape)}-D NIfTI (shape {list(shape)}: a time or vector axis); send "
                         "one 3-D volume (one time point, one component), e.g. nibabel's img.slicer[..., t]")
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception:  # noqa: BLE001
        dtype = np.dtype(object)
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise CodecError(f"{field}: NIfTI data type {dtype} is not accepted; send integer or float voxels "
                         "(no RGB or complex)")
    count = math.prod(shape[:3])
    if count > max_elements:
        raise CodecError(f"{field}: the NIfTI header announces {list(shape[:3])} = {count} voxels, over the "
                         f"limit of {max_elements}; send a smaller volume (crop or downsample it)",
                         413, "array_too_large")
    offset = int(hdr.get_data_offset())
    if offset > MAX_HEADER_BYTES:
        raise CodecError(f"{field}: the NIfTI header extensions take {offset} bytes, over {MAX_HEADER_BYTES}; "
                         "send the file without large extensions")
    return shape[:3], dtype, offset


def _read(data: bytes, field: str) -> tuple:
    """``(read(n), what)``: the file's bytes, inflated on the way for a .nii.gz."""
    if data.startswith(GZIP_MAGIC):
        return GzipReader(data, field).read, "the .nii.gz"
    f = io.BytesIO(data)
    return f.read, "the .nii"


def decode_nifti(data: bytes, field: str, max_elements: int) -> LabVolume:
    """A ``.nii`` / ``.nii.gz`` -> ``[D, H, W]`` float64 (scaling applied) and its header."""
    read, what = _read(data, field)
    head = read(540)
    kind = _kind(head, field)
    hdr = _header(kind, head[:348 if kind == "Nifti1" else 540], field)
    shape, dtype, offset = _check(hdr, field, max_elements)
    need = offset + math.prod(shape) * dtype.itemsize
    budget = need + TRAILING_SLACK
    raw = head + read_bounded(read, max(0, need - len(head)), budget, field, what)
    if len(raw) < need:
        raise CodecError(f"{field}: {what} holds {len(raw)} bytes where its header announces {need}: it is "
                         "truncated; send the complete file")
    ends_within(read, TRAILING_SLACK, field, what, budget)  # no stream going on past the data
    _, image_class = _classes(kind)
    try:
        xyz = image_class.from_bytes(raw[:need]).get_fdata(dtype=np.float64).reshape(shape)
    except Exception:  # noqa: BLE001 - nibabel raises several kinds on bad data
        raise CodecError(f"{field}: the NIfTI voxel data cannot be read; send the file as written") from None
    if not np.isfinite(xyz).all():
        raise CodecError(f"{field}: the NIfTI volume holds NaN or inf; send finite values only")
    return LabVolume(np.ascontiguousarray(xyz.transpose(2, 1, 0)), "nifti",
                     {"kind": kind, "header": raw[:offset].hex()})


def _output_header(source: dict | None):
    """The input's header (with its extensions); for a DICOM series one in its geometry; else a
    new NIfTI-1 header (identity affine)."""
    if source is None or source.get("format") != "nifti":
        klass, _ = _classes("Nifti1")
        hdr = klass()
        if source is not None and source.get("affine") is not None:  # a DICOM series' geometry
            affine = np.array(source["affine"])
            hdr.set_sform(affine, code=1)  # scanner coordinates
            hdr.set_qform(affine, code=1)
            hdr.set_xyzt_units("mm")
        return "Nifti1", hdr
    kind = source["kind"]
    klass, _ = _classes(kind)
    return kind, klass.from_fileobj(io.BytesIO(bytes.fromhex(source["header"])), check=False)


def encode_nifti(volume: np.ndarray, source: dict | None, gzip: bool = True) -> bytes:
    """``[D, H, W]`` (or ``[K, D, H, W]``: K along NIfTI's 4th axis) as a NIfTI file in the
    input's header (affine, units, description, extensions), float32 and unscaled."""
    kind, hdr = _output_header(source)
    _, image_class = _classes(kind)
    a = np.asarray(volume, dtype=np.float32)
    xyz = a.transpose(2, 1, 0) if a.ndim == 3 else a.transpose(3, 2, 1, 0)
    img = image_class(np.ascontiguousarray(xyz), None, header=hdr)
    img.set_data_dtype(np.float32)
    data = img.to_bytes()
    if not gzip:
        return data
    import gzip as gz
    return gz.compress(data, compresslevel=6, mtime=0)
