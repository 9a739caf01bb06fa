"""A zipped DICOM series in, a zipped derived series out (pydicom).

In: each member is inflated within a budget (its header first; then at most the pixel bytes
that header announces, so a bomb is refused while inflating); the transfer syntax is checked
for a decoder before any pixel is decoded (naming the codecs it would need); all members must
be one series of single-frame, one-sample images of one size and orientation. Slices are
ordered by their position along the slice normal ``n = row x column`` (``ImagePositionPatient
. n``), not by file name, and must be evenly spaced. Values are ``stored * RescaleSlope +
RescaleIntercept``. The result is ``[D, H, W]`` (H: rows, W: columns).

Out: each slice's own header (geometry, patient, study, frame of reference kept) with the
result's pixels (16-bit unsigned, one rescale slope and intercept for the series), new Series
and SOP Instance UIDs, ``ImageType`` DERIVED \\ SECONDARY.
"""
from __future__ import annotations

import base64
import io
import math
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..codecs import CodecError
from .limits import bomb, ends_within, member_name, member_reader, open_zip, read_bounded
from .volume import LabVolume

#: Bytes of a member read first, for its header.
HEAD = 1 << 20
#: Bytes a member may hold past its header and announced pixels (padding, trailing tags).
SLACK = 1 << 16
#: Relative tolerance of even slice spacing (positions are often written with few digits).
SPACING_RTOL = 0.01
DEFLATED = "1.2.840.10008.1.2.1.99"
#: The elements a derived slice gets anew (the image pixel module, rescale, identity, type).
NEW_PIXEL_MODULE = ("ImageType", "SeriesInstanceUID", "SOPInstanceUID", "SeriesDescription", "DerivationDescription",
                    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PixelData")


def _err(field: str, message: str) -> CodecError:
    return CodecError(f"{field}: {message}")


def _meta_ts(head: bytes, field: str, name: str) -> str:
    """The member's transfer syntax from its file meta (nothing else read yet)."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(head)
    try:
        read_preamble(fp, False)
        ts = str(_read_file_meta_info(fp).get("TransferSyntaxUID", ""))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, TypeError, AttributeError):
        raise _err(field, f"the zip member {name} is not a DICOM file (no DICM preamble and file meta); send "
                          "a zip of one series' DICOM files (Part 10, with file meta)") from None
    if ts == DEFLATED:
        raise _err(field, f"the zip member {name} uses the Deflated Explicit VR transfer syntax; send the series "
                          "uncompressed (Explicit VR Little Endian), the zip compresses it already")
    return ts


def _check_decoder(ts: str, field: str, name: str) -> None:
    """422 naming the codecs when pydicom cannot decode ``ts`` here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(ts)
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        raise _err(field, f"the zip member {name} has the transfer syntax {ts} ({uid.name}), which has no pixel "
                          "decoder; send the series uncompressed (Explicit VR Little Endian)") from None
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies) or "an extra codec plugin"
        raise _err(field, f"the series uses the transfer syntax {uid.name} ({ts}), which this server cannot "
                          f"decode without extra codecs ({needs}); send it uncompressed (Explicit VR Little "
                          "Endian), e.g. with gdcmconv --raw or dcmdjpeg")


def _pixel_bytes(ds) -> int:
    """Bytes of pixel data the header announces (native encoding), 0 if it has no image."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    return rows * cols * frames * spp * max(1, (bits + 7) // 8)


@dataclass
class _Slice:
    ds: Any  # the whole dataset
    header: Any  # the same without its pixels
    name: str  # the member's name as messages show it


def _read_member(zf, info, field: str, seen: int, max_elements: int) -> tuple[_Slice, int]:
    """One member, read within its budget (``seen``: pixels announced by the members before)."""
    import pydicom

    name = member_name(info)
    read = member_reader(zf, info, field)
    head = read(HEAD)
    _check_decoder(_meta_ts(head, field, name), field, name)
    try:
        header = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a bad or cut header
        raise _err(field, f"the zip member {name} has an invalid or truncated DICOM header; send the "
                          "complete files") from None
    pixels = int(header.get("Rows", 0) or 0) * int(header.get("Columns", 0) or 0) * \
        int(header.get("NumberOfFrames", 1) or 1) * int(header.get("SamplesPerPixel", 1) or 1)
    if seen + pixels > max_elements:
        raise CodecError(f"{field}: the series' headers announce over {max_elements} pixels (the limit); send a "
                         "smaller series (fewer or smaller slices)", 413, "array_too_large")
    budget = HEAD + 2 * _pixel_bytes(header) + SLACK
    rest = read_bounded(read, budget - len(head), budget, field, f"the zip member {name}")
    ends_within(read, 0, field, f"the zip member {name}", budget)
    try:
        ds = pydicom.dcmread(io.BytesIO(head + rest))
    except Exception:  # noqa: BLE001
        raise _err(field, f"the zip member {name} is not a readable DICOM file (corrupt or truncated); send the "
                          "complete files") from None
    if pixels and "PixelData" not in ds:
        raise _err(field, f"the zip member {name} is truncated: its header announces an image and its pixel data "
                          "is missing or cut; send the complete DICOM files")
    return _Slice(ds, header, name), pixels


def _orthonormal(row: np.ndarray, col: np.ndarray) -> bool:
    """Two direction cosines of unit length (to 1 %), at right angles (to about 0.6 degrees)."""
    return abs(np.linalg.norm(row) - 1) < 0.01 and abs(np.linalg.norm(col) - 1) < 0.01 and abs(row @ col) < 0.01


def _geometry(ds, name: str, field: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(orientation (6,), position (3,))`` or None when the slice states neither."""
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is None or ipp is None:
        return None
    try:
        o, p = np.array([float(v) for v in iop]), np.array([float(v) for v in ipp])
    except (TypeError, ValueError):
        o, p = np.zeros(0), np.zeros(0)
    if o.shape != (6,) or p.shape != (3,) or not (np.isfinite(o).all() and np.isfinite(p).all()) or \
            not _orthonormal(o[:3], o[3:]):
        raise _err(field, f"the zip member {name} has an invalid ImageOrientationPatient or "
                          "ImagePositionPatient; send the files as the scanner wrote them")
    return o, p


def _order(slices: list, field: str) -> list:
    """The slices sorted by position along the normal; 422 on mixed orientations, missing
    positions, duplicate positions or uneven spacing."""
    if len(slices) == 1:
        return slices
    geo = [_geometry(s.ds, s.name, field) for s in slices]
    if any(g is None for g in geo):
        raise _err(field, "some slices have no ImagePositionPatient / ImageOrientationPatient, so their order is "
                          "unknown; send a series whose files state them")
    o0 = geo[0][0]
    if any(not np.allclose(g[0], o0, atol=1e-4) for g in geo):
        raise _err(field, "the slices have different orientations (ImageOrientationPatient); send one series "
                          "of parallel slices")
    normal = np.cross(o0[:3], o0[3:])
    where = np.array([float(g[1] @ normal) for g in geo])
    order = np.argsort(where, kind="stable")
    gaps = np.diff(where[order])
    step = float(np.median(gaps))
    if step <= 1e-6 or gaps.min() <= 1e-6:
        raise _err(field, "two slices lie at the same position; send one series (one acquisition) per request")
    if np.abs(gaps - step).max() > SPACING_RTOL * step + 1e-4:
        raise _err(field, f"uneven slice spacing (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm along the "
                          "slice normal: missing or extra slices); send an evenly spaced series, or resample it")
    return [slices[i] for i in order]


def _check_series(slices: list, field: str) -> None:
    series = {str(s.ds.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise _err(field, f"the zip holds {len(series)} series (different SeriesInstanceUID); send one series "
                          "per request")
    for s in slices:
        ds, name = s.ds, s.name
        if "PixelData" not in ds:
            raise _err(field, f"the zip member {name} holds no image (no PixelData): it is truncated, or not an "
                              "image; send only the series' image files, complete")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise _err(field, f"the zip member {name} is multi-frame or colour; send single-frame grayscale "
                              "slices (one file per slice)")
    sizes = {(int(s.ds.Rows), int(s.ds.Columns)) for s in slices}
    if len(sizes) > 1:
        raise _err(field, f"the slices have different sizes {sorted(sizes)}; send one series of equal slices")


def _pixels(ds, name: str, field: str) -> np.ndarray:
    try:
        stored = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception:  # noqa: BLE001 - pydicom's decoders raise many kinds
        raise _err(field, f"the pixel data of the zip member {name} cannot be decoded (truncated or corrupt); "
                          "send the complete files") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return stored * slope + intercept


def _header_bytes(header) -> str:
    """A slice's dataset without its pixels, as a DICOM file (base64)."""
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, header, enforce_file_format=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def is_dicom_file(data: bytes) -> bool:
    """A DICOM Part 10 file (its ``DICM`` prefix after the 128-byte preamble)."""
    return data[128:132] == b"DICM"


def series_zip(data: bytes) -> bytes:
    """A zip of the series: ``data`` itself, or one DICOM file zipped (stored) as a one-slice series."""
    if not is_dicom_file(data):
        return data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("slice.dcm", data)
    return buf.getvalue()


def _affine(slices: list, field: str) -> list | None:
    """The NIfTI affine (RAS+, mm) of the ordered slices' voxels ``[x, y, z] = [column, row,
    slice]``: column i moves ``PixelSpacing[1]`` along the row direction ``IOP[:3]``, row j
    ``PixelSpacing[0]`` along ``IOP[3:]``, slice k from the first slice's position to the last's;
    DICOM's LPS axes flipped to RAS (x and y negated). None without the geometry."""
    first = slices[0].ds
    geo = _geometry(first, slices[0].name, field)
    if geo is None or first.get("PixelSpacing") is None:
        return None
    (iop, p0), (row_spacing, col_spacing) = geo, (float(v) for v in first.PixelSpacing)
    if not (row_spacing > 0 and col_spacing > 0 and math.isfinite(row_spacing * col_spacing)):
        raise _err(field, f"the zip member {slices[0].name} has an invalid PixelSpacing; send the files as the "
                          "scanner wrote them")
    if len(slices) > 1:
        step = (_geometry(slices[-1].ds, slices[-1].name, field)[1] - p0) / (len(slices) - 1)
    else:
        step = np.cross(iop[:3], iop[3:]) * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * col_spacing, iop[3:] * row_spacing, step, p0
    return (np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps).tolist()


def decode_dicom_zip(data: bytes, field: str, max_elements: int) -> LabVolume:
    """A zip of one DICOM series (or one DICOM file) -> ``[D, H, W]`` float64 in the data's
    units, its headers and its affine."""
    try:
        return _decode_series(data, field, max_elements)
    except CodecError:
        raise
    except Exception:  # noqa: BLE001 - pydicom converts values when read: a corrupt one fails wherever that is
        raise _err(field, "a file of the series holds an invalid value (corrupt); send the files as the scanner "
                          "wrote them") from None


def _decode_series(data: bytes, field: str, max_elements: int) -> LabVolume:
    zf, members = open_zip(series_zip(data), field)
    if not members:
        raise _err(field, "the zip holds no files; send a zip of one DICOM series")
    slices, seen = [], 0
    for info in members:
        s, pixels = _read_member(zf, info, field, seen, max_elements)
        slices.append(s)
        seen += pixels
    _check_series(slices, field)
    slices = _order(slices, field)
    volume = np.stack([_pixels(s.ds, s.name, field) for s in slices])
    if not np.isfinite(volume).all():
        raise _err(field, "the series holds NaN or inf values; send finite values only")
    return LabVolume(volume, "dicom", {"headers": [_header_bytes(s.header) for s in slices],
                                       "affine": _affine(slices, field)})


# ----------------------------------------------------------------------------- out
def _rescaled(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(uint16 stored values, slope, intercept)`` with ``stored * slope + intercept ~ volume``."""
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((volume - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def _derived(ds, pixels: np.ndarray, slope: float, intercept: float, series_uid: str) -> None:
    """``ds`` (a source slice's header) made the result's slice in place."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import DSfloat

    image_type = [str(v) for v in (ds.get("ImageType", []) or [])]
    description = str(ds.get("SeriesDescription", "") or "")
    for keyword in ("ModalityLUTSequence", "VOILUTSequence", "PixelPaddingValue", "SmallestImagePixelValue",
                    "LargestImagePixelValue", "PixelPaddingRangeLimit", *NEW_PIXEL_MODULE):
        if keyword in ds:  # removed unread (a stale value is never parsed), then written anew
            delattr(ds, keyword)
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesDescription = ("reconserve " + description)[:64].strip()
    ds.DerivationDescription = "reconserve: diffusion-prior reconstruction of the source series"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 0
    if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope = DSfloat(slope, auto_format=True)
    ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"


def encode_dicom_zip(volume: np.ndarray, source: dict) -> bytes:
    """``[D, H, W]`` in the data's units as a zip of a derived series, slice k in source slice
    k's header."""
    import pydicom
    from pydicom.uid import generate_uid

    headers = source["headers"]
    stored, slope, intercept = _rescaled(np.asarray(volume, dtype=np.float64))
    series_uid = generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, header in enumerate(headers):
            try:
                ds = pydicom.dcmread(io.BytesIO(base64.b64decode(header)))
                _derived(ds, stored[k], slope, intercept, series_uid)
                out = io.BytesIO()
                pydicom.dcmwrite(out, ds, enforce_file_format=True)
            except Exception:  # noqa: BLE001 - a value of the source header pydicom cannot write back
                raise CodecError(f"format: slice {k + 1}'s DICOM header holds a value that cannot be written "
                                 "back (corrupt); ask for format=nifti, which keeps the series' geometry",
                                 422, "invalid_request") from None
            zf.writestr(f"{k + 1:04d}.dcm", out.getvalue())
    return buf.getvalue()
