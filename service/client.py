"""The Python client: ``reconserve_client`` (``clients/python/``, shipped in this package's wheel
too), re-exported here for the code that imports ``service.client``."""
from reconserve_client import (  # noqa: F401 - re-exports
    ARRAY_KEYS, FINAL, RESULT_FORMATS, SUFFIXES, Client, ServiceError, encode_path, file_format, is_path,
    result_format, write_result_file,
)
