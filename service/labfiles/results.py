"""A job's result as a file: ``?format=nifti|dicom|tiff|npy`` (or the ``Accept`` type) and
``?field=mean|std|samples``, in the data's units (the ``value_window`` undone) and, for NIfTI
and DICOM, in the observation's geometry (API.md "Lab data").

Shapes: a 2-D job's mean is ``[C, H, W]`` and its samples ``[K, C, H, W]``; a volume's mean is
``[D, C, H, W]`` and its samples ``[K, D, C, H, W]``. Files hold slices first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guidance.solve import PosteriorStats

from ..codecs import CodecError, npy_bytes
from .dicom import encode_dicom_zip
from .nifti import encode_nifti
from .tiff import encode_tiff
from .window import Window

#: format -> (media type, file name extension).
FORMATS = {"nifti": ("application/x-nifti", ".nii.gz"), "dicom": ("application/zip", ".zip"),
           "tiff": ("image/tiff", ".tif"), "npy": ("application/x-npy", ".npy")}
FIELDS = ("mean", "std", "samples")


@dataclass
class Samples(PosteriorStats):
    """Posterior samples with their mean and std (what a result file is written from)."""

    samples: np.ndarray


def wanted_format(format_: str | None, accept: str) -> str | None:
    """The file format asked for (``format`` first, then ``Accept``), None for JSON."""
    if format_ is not None:
        return format_
    accept = accept.lower()
    for name, (media, _) in FORMATS.items():
        if media in accept:
            return name
    return None


def field_array(result, field: str, window: Window) -> np.ndarray:
    """``mean``, ``std`` or ``samples`` of ``result``, in the data's units."""
    if field == "std":
        if result.std is None:
            raise CodecError("field: the job drew one sample, so it has no std; send num_samples >= 2 for one, "
                             "or ask for field=mean or samples", 422, "invalid_request")
        return window.spread(result.std)
    return window.values(result.samples if field == "samples" else result.mean)


def _slices(arr: np.ndarray, samples: bool) -> np.ndarray:
    """``[D, C, H, W]`` (``[K, D, C, H, W]`` for samples): a 2-D job's result is one slice."""
    two_d = arr.ndim == (4 if samples else 3)
    return (arr[:, None] if samples else arr[None]) if two_d else arr


def _one_channel(vol: np.ndarray, fmt: str) -> np.ndarray:
    if vol.shape[-3] != 1:
        raise CodecError(f"format: a {fmt} file holds one channel and this result has {vol.shape[-3]}; ask for "
                         "format=tiff or npy", 422, "invalid_request")
    return vol[..., 0, :, :]


def _dicom(vol: np.ndarray, field: str, source: dict | None) -> bytes:
    if source is None or source.get("format") != "dicom":
        raise CodecError("format: dicom needs a DICOM observation (its slices' geometry and identifiers); ask "
                         "for format=nifti, tiff or npy", 422, "invalid_request")
    if field == "samples":
        raise CodecError("format: dicom writes one series (the mean or the std); ask for field=mean or std, or "
                         "for the samples as format=nifti or npy", 422, "invalid_request")
    vol = _one_channel(vol, "DICOM")
    if len(vol) != len(source["headers"]):
        raise CodecError(f"format: the result has {len(vol)} slices, the DICOM series {len(source['headers'])}; "
                         "ask for format=nifti or npy", 422, "invalid_request")
    return encode_dicom_zip(vol, source)


def result_file(fmt: str, field: str, result, lab: dict) -> bytes:
    """The file of ``field`` in ``fmt`` (``lab``: the job's ``read_lab_record``)."""
    window = Window(*lab["window"])
    arr = field_array(result, field, window)
    if fmt == "npy":
        return npy_bytes(np.asarray(arr, dtype=np.float32))
    samples = field == "samples"
    vol = _slices(np.asarray(arr), samples)
    if fmt == "tiff":
        return encode_tiff(vol.reshape((-1,) + vol.shape[-3:]) if samples else vol)
    if fmt == "nifti":
        return encode_nifti(_one_channel(vol, "NIfTI"), lab["source"])
    return _dicom(vol, field, lab["source"])
