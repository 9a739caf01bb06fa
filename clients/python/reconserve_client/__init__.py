"""reconserve-client: the reconserve HTTP API from Python, with numpy and httpx only (no torch).

    from reconserve_client import Client, ServiceError

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        out = c.reconstruct("grf-32", {"kind": "inpainting", "mask": mask}, y, method="fast")
        job = c.submit("phantom-64", {"kind": "ct", "angles": 30}, "scan.nii.gz")
        c.wait(job, progress=print)
        c.save_result(job, "recon.nii.gz")

The server's package ships this same module (``service.client`` re-exports it).
"""
from .arrays import from_encoded, npy_bytes, to_npy_field, walk_arrays
from .client import ARRAY_KEYS, FINAL, Client, ServiceError
from .files import RESULT_FORMATS, SUFFIXES, encode_path, file_format, is_path, result_format, write_result_file

__version__ = "0.1.0"
__all__ = ["ARRAY_KEYS", "FINAL", "RESULT_FORMATS", "SUFFIXES", "Client", "ServiceError", "encode_path",
           "file_format", "from_encoded", "is_path", "npy_bytes", "result_format", "to_npy_field",
           "walk_arrays", "write_result_file"]
