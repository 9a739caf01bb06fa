"""A lab file decoded: its slices and what writing a result in the same format needs.

``LabVolume.meta`` is small and JSON: the NIfTI header bytes, each DICOM slice's header without
its pixels, a TIFF's page count. The service keeps it with the job, beside the request's arrays
(``lab_record`` / ``read_lab_record``: a JSON document as a ``uint8`` array, so it travels
through the job store like any request array and survives a restart).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

#: The name the lab record has among a job's request arrays.
LAB_RECORD = "observation.lab"


@dataclass
class LabVolume:
    """``array``: ``[D, H, W]`` or ``[D, C, H, W]`` float64, slices first; ``format``: ``nifti``,
    ``dicom`` or ``tiff``; ``meta``: what the format's writer needs (JSON-able)."""

    array: np.ndarray
    format: str
    meta: dict = field(default_factory=dict)

    @property
    def slices(self) -> int:
        return int(self.array.shape[0])

    def source(self) -> dict:
        return {"format": self.format, **self.meta}


def lab_record(source: dict | None, scale: float = 1.0, offset: float = 0.0) -> np.ndarray | None:
    """What a job keeps of its observation's file: the source (format and header) and the
    ``value_window``'s map (``x_data = offset + scale x_card``), as a ``uint8`` array (None when
    there is neither)."""
    if source is None and (scale, offset) == (1.0, 0.0):
        return None
    doc = {"source": source, "window": [float(scale), float(offset)]}
    return np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy()


def read_lab_record(data: bytes | None) -> dict:
    """``{"source": dict | None, "window": [scale, offset]}`` from the ``.npy`` bytes of
    ``lab_record``'s array (None: the job has none)."""
    if data is None:
        return {"source": None, "window": [1.0, 0.0]}
    arr = np.load(io.BytesIO(data), allow_pickle=False)  # the job store's own file
    return json.loads(np.asarray(arr, dtype=np.uint8).tobytes().decode())
