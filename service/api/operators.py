"""Operator kinds on the wire: spec models whose array fields take the request's encodings.

A kind declares its parameters once (``operators.<module>.<Kind>Spec``). On the wire an array
parameter is a nested list or an encoding the service decodes (``{"npy": ...}`` and the like,
API.md "Arrays"): ``wire_spec(cls)`` derives the kind's model with those array fields, which
the request schema, ``GET /v1/operators`` and the parsing of a request's ``operator`` block use.
"""
from __future__ import annotations

import functools
import typing
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema, create_model

from operators.checks import Invalid, OperatorSpecError
from operators.params import OperatorSpec

from ..labfiles import ENCODINGS
from ..errors import ApiError

#: What each encoding of an array holds (API.md "Arrays").
ENCODING_DOCS = {
    "npy": "base64 of a .npy file (numeric or bool dtype)",
    "png": "base64 of a PNG image: 8-bit / 255, 16-bit / 65535",
    "tiff": "base64 of a TIFF image: 8-bit / 255, 16-bit / 65535, float as is; several pages are slices",
    "nifti": "base64 of a NIfTI-1/2 file (.nii or .nii.gz): axes x, y, z become W, H, D",
    "dicom": "base64 of a zip of one DICOM series: slices ordered by position, rescale applied",
    "file": "in a multipart request: the name of the file part holding the array (.npy, .png, .tif, .nii, "
            ".nii.gz, a DICOM .zip)",
}

#: JSON schema of an array parameter: a nested list of numbers or one of the encodings.
ARRAY_SCHEMA: dict = {"anyOf": [
    {"type": "array", "items": {}, "description": "nested list of numbers"},
    *({"type": "object", "properties": {k: {"type": "string", "description": d}}, "required": [k],
       "additionalProperties": False} for k, d in ENCODING_DOCS.items()),
]}


def _wire_array(value):
    """Structure only (the service decodes, then the kind checks shape and values)."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in ENCODINGS and isinstance(next(iter(value.values())), str):
            return value
        raise Invalid("is not an array encoding",
                      'a nested list of numbers or one of {"npy"|"png"|"tiff"|"nifti"|"dicom"|"file": "<string>"}')
    if isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        return value
    raise Invalid(f"expected an array, got {type(value).__name__}",
                  'a nested list of numbers or {"npy": "<base64>"}')


#: An array parameter as a request holds it.
WireArray = Annotated[Any, BeforeValidator(_wire_array), WithJsonSchema(ARRAY_SCHEMA)]


def _wire_type(annotation):
    """``Array`` -> ``WireArray``; ``Array | None`` -> ``WireArray | None``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return typing.Optional[WireArray]
    return WireArray


@functools.cache
def wire_spec(spec: type[OperatorSpec]) -> type[OperatorSpec]:
    """The kind's spec model with its array fields as the request encodes them (same name, doc,
    defaults and validators; a subclass, so the kind's checks take its instances)."""
    fields = {}
    for name in spec.array_fields():
        f = spec.model_fields[name]
        default = ... if f.is_required() else f.default
        fields[name] = (_wire_type(f.annotation), Field(default, description=f.description))
    wire = create_model(spec.__name__, __base__=spec, __module__=spec.__module__, __doc__=spec.__doc__, **fields)
    wire.array_fields = classmethod(lambda _: spec.array_fields())  # the kind's, whatever their wire type
    return wire


def operator_schema(cls) -> dict:
    """JSON schema (2020-12) of a kind's parameters as a request sends them."""
    schema = wire_spec(cls.Spec).model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": cls.kind}


def describe_operator(cls) -> dict:
    """A kind as ``GET /v1/operators`` lists it."""
    return {"kind": cls.kind, "observation_shape": cls.observation_shape, "schema": operator_schema(cls)}


def parse_operator(cls, block: Any) -> OperatorSpec:
    """A request's ``operator`` block parsed by its kind's wire model (arrays still encoded)."""
    return wire_spec(cls.Spec).parse(block)


def operator_error(e: OperatorSpecError, code: str = "invalid_operator", status: int = 422) -> ApiError:
    """An operator (or PDE) spec error as the API answers it."""
    return ApiError(status, code, e.render("send", "GET /v1/operators"))
