"""Real lab files for the tests, written by the libraries labs use: NIfTI by nibabel, DICOM
series by pydicom, TIFF stacks by tifffile; and decompression bombs made on the fly (a 1 GB
inflated stream is a few hundred kB compressed: identical deflate segments repeated)."""
from __future__ import annotations

import base64
import functools
import gzip
import io
import struct
import zipfile
import zlib

import numpy as np

#: An oblique geometry: rows along x, columns tilted in the y-z plane.
ORIENTATION = [1.0, 0.0, 0.0, 0.0, 0.9805806756909202, 0.19611613513818404]
SPACING = [0.7, 0.8]  # PixelSpacing: between rows, between columns (mm)
ORIGIN = np.array([-12.5, 30.25, -80.0])
AFFINE = np.array([[0.8, 0.05, 0.0, -90.0], [0.0, 0.9, 0.1, -100.0], [0.0, 0.0, 2.5, -50.0], [0.0, 0.0, 0.0, 1.0]])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------- NIfTI
def nifti_bytes(xyz: np.ndarray, affine=AFFINE, *, gz: bool = True, version: int = 1, slope=None,
                descrip: bytes = b"lab scan") -> bytes:
    """``xyz`` (NIfTI's [x, y, z(, t)] order) as a single-file NIfTI written by nibabel."""
    import nibabel as nib

    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = cls(xyz, affine)
    img.header["descrip"] = descrip
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(*slope)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def read_nifti(data: bytes):
    import nibabel as nib

    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    kind = nib.Nifti1Image if struct.unpack("<i", raw[:4])[0] == 348 else nib.Nifti2Image
    return kind.from_bytes(raw)


# ----------------------------------------------------------------------------- DICOM
def dicom_slice(stored: np.ndarray, k: int, *, series_uid: str, study_uid: str, frame_uid: str, step=2.5,
                slope=2.0, intercept=-1024.0, transfer_syntax=None, position=None) -> bytes:
    """One CT slice (Part 10 file, pydicom) of stored int16 values at slice index ``k``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Lab^Phantom", "LAB-0042", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyID, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "S1", "ACC7", 3, k + 1
    ds.Modality, ds.ImageType, ds.SeriesDescription = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"], "head"
    normal = np.cross(ORIENTATION[:3], ORIENTATION[3:])
    pos = ORIGIN + k * step * normal if position is None else np.asarray(position)
    ds.ImagePositionPatient = [float(v) for v in pos]
    ds.ImageOrientationPatient = ORIENTATION
    ds.PixelSpacing, ds.SliceThickness = SPACING, step
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if transfer_syntax is None:
        ds.PixelData = stored.astype("<i2").tobytes()
    else:
        from pydicom.encaps import encapsulate
        ds.PixelData = encapsulate([b"\xff\xd8 not really compressed \xff\xd9"])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_zip(stored: np.ndarray, *, order=None, series_uids=None, positions=None, **kw) -> bytes:
    """A zip of the series ``stored`` ``[D, H, W]`` (int16), members written in ``order`` (slice
    indices; default in order) under names that do not sort by position."""
    from pydicom.uid import generate_uid

    uids = dict(series_uid=generate_uid(), study_uid=generate_uid(), frame_uid=generate_uid())
    order = range(len(stored)) if order is None else order
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, k in enumerate(order):
            args = dict(uids, **kw)
            if series_uids is not None:
                args["series_uid"] = series_uids[k]
            if positions is not None:
                args["position"] = positions[k]
            zf.writestr(f"IMG{(7 * n + 3) % 97:05d}", dicom_slice(stored[k], k, **args))
    return buf.getvalue()


def read_dicom_zip(data: bytes) -> list:
    """The datasets of a zip, in member order."""
    import pydicom

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in zf.namelist()]


# ----------------------------------------------------------------------------- TIFF
def tiff_stack(pages: np.ndarray, **kw) -> bytes:
    """``[D, H, W]``: D grayscale pages (tifffile)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, pages, **{"photometric": "minisblack", **kw})
    return buf.getvalue()


# ----------------------------------------------------------------------------- bombs
ZEROS = 1 << 24  # 16 MiB of zeros per repeated segment


def _zero_segments(count: int) -> tuple[bytes, int]:
    """A raw deflate segment of ``ZEROS`` zeros (full-flushed, so copies concatenate) repeated."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    seg = z.compress(bytes(ZEROS)) + z.flush(zlib.Z_FULL_FLUSH)
    return seg * count, ZEROS * count


@functools.lru_cache(maxsize=4)
def gzip_bomb(prefix: bytes, inflated: int = 1 << 30) -> bytes:
    """``prefix`` then zeros, at least ``inflated`` bytes in all, as one gzip member."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    zeros, n = _zero_segments(-(-(inflated - len(prefix)) // ZEROS))  # at least ``inflated`` in all
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    crc = zlib.crc32(prefix)
    block = bytes(ZEROS)
    for _ in range(n // ZEROS):
        crc = zlib.crc32(block, crc)
    size = len(prefix) + n
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + body + zeros + tail + struct.pack("<II", crc, size & 0xFFFFFFFF)


def zip_bomb(prefix: bytes, inflated: int = 1 << 30, name: str = "slice0001.dcm") -> bytes:
    """A zip of one member, ``prefix`` then zeros (at least ``inflated`` bytes), its sizes and CRC
    stated truthfully."""
    gz = gzip_bomb(prefix, inflated)
    deflated, (crc, size) = gz[10:-8], struct.unpack("<II", gz[-8:])
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.compress_type, info.CRC, info.compress_size, info.file_size = zipfile.ZIP_DEFLATED, crc, len(deflated), size
    local = info.FileHeader(zip64=False)
    central = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, zipfile.ZIP_DEFLATED, 0, 0x21,
                          crc, len(deflated), size, len(name), 0, 0, 0, 0, 0, 0) + name.encode()
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(deflated), 0)
    return local + deflated + central + end
