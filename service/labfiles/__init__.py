"""Lab file formats in and out: multi-page TIFF, NIfTI-1/2 and zipped DICOM series (API.md
"Lab data"), decoded within the size limits and with bounded inflation, and the results written
back in the input's format and geometry."""
from .decode import ENCODINGS, LAB_ENCODINGS, Decoded, decode_any
from .volume import LAB_RECORD, LabVolume, lab_record, read_lab_record
from .window import Window, make_window

__all__ = ["ENCODINGS", "LAB_ENCODINGS", "LAB_RECORD", "Decoded", "LabVolume", "Window", "decode_any",
           "lab_record", "make_window", "read_lab_record"]
