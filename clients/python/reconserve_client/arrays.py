"""Arrays on the wire (API.md "Arrays"): a numpy array travels as ``{"npy": base64 of the .npy
file}``, written by ``numpy.save`` and read back by ``numpy.load``, never with pickle.

The server's own decoders (which trust nothing: headers checked first, sizes limited) live in
the server's ``service.codecs``; these are the plain encoding both sides share.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Callable

import numpy as np


def npy_bytes(arr: np.ndarray) -> bytes:
    """The ``.npy`` file of ``arr`` (C order, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def to_npy_field(arr: np.ndarray) -> dict:
    """How a client sends an array: ``{"npy": base64}``."""
    return {"npy": base64.b64encode(npy_bytes(np.asarray(arr))).decode("ascii")}


def from_encoded(value: Any) -> np.ndarray | None:
    """A response array (``{"npy": ...}``) back to numpy (client side; trusted-ish, still no pickle)."""
    if value is None:
        return None
    data = base64.b64decode(value["npy"])
    return np.load(io.BytesIO(data), allow_pickle=False)


def walk_arrays(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to numpy arrays inside nested dicts/lists (client-side encoding)."""
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: walk_arrays(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [walk_arrays(v, fn) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
