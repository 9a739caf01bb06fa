"""A lab file's shape from its header alone (for admission, before anything is decoded):
``(D, H, W)``, or ``(H, W)`` for one slice, as ``decode_any`` would give it; None when the
header cannot be read (the decoder then answers with what to send)."""
from __future__ import annotations

import io
from typing import Mapping

from .limits import GZIP_MAGIC, GzipReader, member_reader, open_zip

#: Bytes of a DICOM member read for its header.
HEAD = 1 << 16


def _nifti(data: bytes) -> tuple[int, ...] | None:
    from .nifti import _header, _kind

    head = GzipReader(data, "observation").read(540) if data.startswith(GZIP_MAGIC) else data[:540]
    kind = _kind(head, "observation")
    shape = tuple(int(d) for d in _header(kind, head[:348 if kind == "Nifti1" else 540], "observation")
                  .get_data_shape())
    x, y, z = (shape + (1, 1, 1))[:3]
    return (y, x) if z == 1 else (z, y, x)


def _dicom(data: bytes) -> tuple[int, ...] | None:
    import pydicom

    from .dicom import series_zip

    zf, members = open_zip(series_zip(data), "observation")
    head = member_reader(zf, members[0], "observation")(HEAD)
    ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
    h, w = int(ds.Rows), int(ds.Columns)
    return (h, w) if len(members) == 1 else (len(members), h, w)


def lab_shape(value, files: Mapping[str, bytes] | None = None) -> tuple[int, ...] | None:
    """The shape of a ``{"nifti"|"dicom": b64}`` or a NIfTI / DICOM file part, or None."""
    from .decode import _lab_file

    try:
        lab = _lab_file(value, "observation", files) if isinstance(value, Mapping) else None
        if lab is None or lab[0] not in ("nifti", "dicom"):
            return None
        return (_nifti if lab[0] == "nifti" else _dicom)(lab[1])
    except Exception:  # noqa: BLE001 - a damaged header: the decoder answers it properly later
        return None
