"""The Open Inference Protocol (KServe v2) on the /v1 service: an infer request read as a /v1
request body, a result answered as the protocol's outputs, a card as the model's metadata.

An infer request has one input, ``observation`` (FP32 or FP64, the observation's shape), and
``parameters`` holding the /v1 request's other fields (``operator``, ``method``, ``noise_sigma``,
...): a string is read as JSON text where it is JSON (``'{"kind": "identity"}'``, ``"0.1"``),
else taken as it is; a bare ``method`` name means ``{"name": ...}``. The observation reaches the
/v1 path as a ``.npy`` file part (``{"file": "observation"}``), so every /v1 check, the admission,
the queue and the job store see exactly what a /v1 request with that array gives them.

The binary tensor extension: with the header ``Inference-Header-Content-Length: n`` the body's
first ``n`` bytes are the JSON and the rest the tensor data of the inputs that state
``binary_data_size`` (little-endian, row-major); an output is sent that way when its request
says ``"binary_data": true``, or the request's parameters ``"binary_data_output": true``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .body import Body
from .codecs import MAX_DIMS, CodecError, decode_list, loads_strict, npy_bytes
from .errors import ApiError

#: The input's datatypes -> numpy's little-endian dtypes.
DATATYPES = {"FP32": "<f4", "FP64": "<f8"}
OUTPUTS = ("mean", "std")
OBSERVATION = "observation"
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Request parameters of the protocol itself (not fields of the /v1 request).
BINARY_OUTPUT = "binary_data_output"


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


@dataclass
class InferRequest:
    """An infer request, read: the /v1 fields, the observation, the outputs asked for."""

    fields: dict
    observation: np.ndarray
    outputs: dict[str, bool | None] = field(default_factory=dict)  # requested_outputs
    binary_output: bool = False
    id: str | None = None

    def binary(self, name: str) -> bool:
        asked = self.outputs.get(name)
        return self.binary_output if asked is None else asked

    def body(self, model_id: str, size: int, digest: str) -> Body:
        """The /v1 request body this infer request is: the observation as a ``.npy`` file part."""
        return Body({**self.fields, "model": model_id, "observation": {"file": OBSERVATION}},
                    {OBSERVATION: npy_bytes(self.observation)}, size, digest)


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """``(JSON, binary tensor data)`` of a body (the binary extension's header splits it)."""
    if header_length is None:
        return raw, b""
    n = header_length.strip()
    if not n.isdigit() or int(n) > len(raw):
        raise invalid(f"{HEADER_LENGTH} must be the byte length of the JSON at the start of the body; "
                      "send it, or leave the header out for a JSON-only body")
    return raw[:int(n)], raw[int(n):]


def read_infer(raw: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    """An infer request's body read (422 when it is not one; 413 for an array over the limit)."""
    head, tail = split_body(raw, header_length)
    try:
        doc = loads_strict(head)
    except CodecError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    if not isinstance(doc, dict) or set(doc) - {"id", "parameters", "inputs", "outputs"}:
        raise invalid('the body must be an infer request: {"inputs": [{"name": "observation", ...}], '
                      '"parameters": {...}, "outputs": [...], "id": ...} and no other keys')
    inputs = doc.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)
            and inputs[0].get("name") == OBSERVATION):
        raise invalid('inputs: send exactly one input, named "observation" (the other fields of the request '
                      "go in parameters)")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid("parameters: expected an object of name: value")
    if doc.get("id") is not None and not isinstance(doc["id"], str):
        raise invalid("id: expected a string")
    params = dict(params)
    binary_output = params.pop(BINARY_OUTPUT, False)
    if not isinstance(binary_output, bool):
        raise invalid(f"parameters.{BINARY_OUTPUT}: expected true or false")
    fields = {k: request_field(k, v) for k, v in params.items()}
    outputs = requested_outputs(doc.get("outputs"), fields)
    return InferRequest(fields, tensor(inputs[0], tail, max_elements), outputs, binary_output, doc.get("id"))


def request_field(name: str, value: Any) -> Any:
    """A parameter as the /v1 request's field: JSON text read, a bare method name a method."""
    if name in ("model", OBSERVATION):
        raise invalid(f"parameters.{name}: not a parameter; the model is the one in the URL and the observation "
                      "the input named observation")
    if isinstance(value, str):
        try:
            value = loads_strict(value)
        except CodecError:  # not JSON: the text itself (e.g. completion: auto)
            pass
    if name == "method" and isinstance(value, str):
        value = {"name": value}
    return value


def requested_outputs(spec: Any, fields: dict) -> dict[str, bool | None]:
    """The outputs asked for: name -> as binary data (None: as the request's
    ``binary_data_output`` says); empty: every output the result has."""
    if spec is None:
        return {}
    if not isinstance(spec, list) or not all(isinstance(o, dict) for o in spec):
        raise invalid('outputs: expected a list of {"name": "mean" | "std", "parameters": {...}}')
    out = {}
    for o in spec:
        name, params = o.get("name"), o.get("parameters") or {}
        if name not in OUTPUTS:
            raise invalid(f"outputs: the outputs are {list(OUTPUTS)}; ask for those")
        binary = params.get("binary_data", None) if isinstance(params, dict) else None
        out[name] = bool(binary) if binary is not None else None
    n = fields.get("num_samples", 1)
    if "std" in out and isinstance(n, (int, float)) and not isinstance(n, bool) and n < 2:
        raise invalid("outputs: std needs more than one sample; send parameters.num_samples >= 2, or ask for mean")
    return out


def _shape(spec: dict) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise invalid(f"observation.shape: expected a list of at most {MAX_DIMS} non-negative integers")
    return tuple(shape)


def tensor(spec: dict, tail: bytes, max_elements: int) -> np.ndarray:
    """The input's array, from its ``data`` (JSON, flat or nested) or from the binary tail."""
    dtype = DATATYPES.get(spec.get("datatype")) if isinstance(spec.get("datatype"), str) else None
    if dtype is None:
        raise invalid(f"observation.datatype: send one of {list(DATATYPES)}")
    shape = _shape(spec)
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        if tail:
            raise invalid("the body has binary data after the JSON, but the input states no "
                          "parameters.binary_data_size; state it, or send the data as JSON")
        if "data" not in spec:
            raise invalid("observation.data: is required (or binary data with parameters.binary_data_size)")
        try:
            arr = decode_list(spec["data"], OBSERVATION, max_elements)
        except CodecError as e:
            raise ApiError(e.status, e.code, str(e)) from None
        if arr.size != count:
            raise invalid(f"observation.data: {arr.size} values for shape {list(shape)} ({count} values); "
                          "send as many values as the shape holds")
        return arr.reshape(shape).astype(dtype)
    item = np.dtype(dtype).itemsize
    if not isinstance(size, int) or size != len(tail) or size != count * item:
        raise invalid(f"observation.parameters.binary_data_size: the binary data must be {count} x {item} = "
                      f"{count * item} bytes (shape {list(shape)}, {spec['datatype']}) and all that follows the JSON")
    return np.frombuffer(tail, dtype=dtype).reshape(shape)


def digest(raw: bytes) -> str:
    """The request's fingerprint (``Idempotency-Key``): its bytes as sent."""
    return hashlib.sha256(raw).hexdigest()


def response(model_id: str, infer: InferRequest, arrays: dict[str, np.ndarray], parameters: dict):
    """``(body bytes, headers)``: the outputs in FP32 (as /v1's results), binary where asked."""
    outputs, blobs = [], []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr, dtype="<f4")
        out = {"name": name, "datatype": "FP32", "shape": list(a.shape)}
        if infer.binary(name):
            blobs.append(a.tobytes())
            out["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            out["data"] = a.ravel().tolist()
        outputs.append(out)
    doc = {"model_name": model_id, **({"id": infer.id} if infer.id is not None else {}),
           "parameters": parameters, "outputs": outputs}
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


# ----------------------------------------------------------------------------- metadata
def model_metadata(card: dict, request_model) -> dict:
    """The model's metadata: the input ``observation``, the outputs, the parameters it takes."""
    c, h, w = (int(s) for s in card["shape"])
    shape = [c, -1, -1] if (card.get("sizes") or {}).get("any") else [c, h, w]
    note = ("the observation's shape under the operator (docs/API.md, GET /v1/operators): [C, H, W] for identity, "
            "inpainting and blur; -1: any size the card's sizes allow")
    return {"name": card["id"], "platform": f"reconserve_{card.get('kind', 'image')}",
            "inputs": [{"name": OBSERVATION, "datatype": "FP32", "shape": shape,
                        "parameters": {"datatypes": ",".join(DATATYPES), "shape": note}}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": shape} for name in OUTPUTS],
            "parameters": parameter_docs(card, request_model)}


def parameter_docs(card: dict, request_model) -> dict[str, str]:
    """Each /v1 request field an infer request takes as a parameter: required or its default, and
    its description (from the request model: the one declaration of the fields)."""
    docs = {}
    methods = card.get("methods") or [{}]
    for name, f in request_model.model_fields.items():
        key = f.alias or name
        if key in ("model", OBSERVATION):
            continue
        if f.is_required():
            head = "required"
        elif key == "method":
            head = f"default: the card's first method ({methods[0].get('name', 'its default')})"
        else:
            head = f"default {json.dumps(f.get_default(call_default_factory=True))}"
        docs[key] = head + (f"; {f.description}" if f.description else "")
    docs[BINARY_OUTPUT] = "default false; true: every output as binary tensor data"
    return docs
