"""An operator kind is one class: spec model, checks against the shape, JSON schema, observation
shape, construction and ``observed``; the registry and the service's request model come from it."""
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field

from operators import OPERATORS, LinearOperator, Operator, OperatorSpecError, build_operator
from operators.params import Array, Integer, OperatorSpec, array, fail
from service.api.operators import operator_schema, parse_operator

SHAPE = (2, 8, 8)
MASK = (np.arange(64).reshape(8, 8) % 3 == 0).astype(float)
GOOD = {
    "identity": {"kind": "identity"},
    "inpainting": {"kind": "inpainting", "mask": MASK},
    "sparse_points": {"kind": "sparse_points", "points": [[0, 1, 2], [1, 7, 7]]},
    "blur": {"kind": "blur", "gaussian": {"sigma": 1.0}},
    "super_resolution": {"kind": "super_resolution", "factor": 2},
    "compressed_sensing": {"kind": "compressed_sensing", "m": 20, "seed": 3},
    "mri": {"kind": "mri", "mask": MASK},
}


def test_every_registered_kind_is_one_complete_class():
    assert set(GOOD) <= set(OPERATORS)
    for kind, cls in OPERATORS.items():
        assert cls.kind == kind and cls.Spec is not None and cls.Spec.kind_name() == kind
        assert cls.observation_shape.startswith("[")
        schema = operator_schema(cls)
        assert schema["title"] == kind and schema["properties"]["kind"]["const"] == kind
        assert set(cls.Spec.array_fields()) <= set(schema["properties"])


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_from_spec_is_build_operator(kind):
    spec = GOOD[kind]
    a, b = OPERATORS[kind].from_spec(spec, SHAPE), build_operator(spec, SHAPE)
    assert type(a) is type(b) is OPERATORS[kind]
    x = torch.randn((1,) + SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x), b(x))
    # the parsed spec model is accepted as well as the dict
    parsed = OPERATORS[kind].parse_spec(spec)
    assert isinstance(parsed, OPERATORS[kind].Spec)
    assert torch.equal(OPERATORS[kind].from_spec(parsed, SHAPE)(x), a(x))


def test_parse_checks_structure_only_and_takes_encodings():
    """Parsing by the kind's wire model (what the service does before decoding anything) accepts
    every array encoding; the kind's own model takes arrays only; the shape checks need decoded arrays."""
    inp = OPERATORS["inpainting"]
    for enc in ({"npy": "AAAA"}, {"png": "x"}, {"tiff": "x"}, {"file": "mask"}, [[1, 0]], np.ones(3)):
        assert parse_operator(inp, {"kind": "inpainting", "mask": enc}).mask is enc
    for bad in ({"npy": "a", "png": "b"}, {"npz": "x"}, {"npy": 3}, "mask", 3.0, None):
        with pytest.raises(OperatorSpecError, match="operator.mask"):
            parse_operator(inp, {"kind": "inpainting", "mask": bad})
        with pytest.raises(OperatorSpecError, match="operator.mask"):
            inp.parse_spec({"kind": "inpainting", "mask": bad})
    for arr in ([[1, 0]], np.ones(3)):
        assert inp.parse_spec({"kind": "inpainting", "mask": arr}).mask is arr
    with pytest.raises(OperatorSpecError, match="expected an array"):
        inp.validate_spec({"kind": "inpainting", "mask": {"npy": "AAAA"}}, SHAPE)


def test_observed_defaults_to_everything():
    y = torch.randn(2, 5)
    assert Operator((1, 2, 2)).observed(y) is y


# ----------------------------------------------------------------------------- a new kind
class NegateSpec(OperatorSpec):
    """y = -x on the first n rows. Observation [C,n,W]."""

    kind: Literal["negate_rows"]
    rows: Integer(minimum=1) = Field(description="rows observed")
    weights: Array | None = Field(None, description="Array [C]: per-channel factors (default 1)")


class NegateRows(LinearOperator):
    """A toy kind, defined only here: what a new kind has to say to be served."""

    kind = "negate_rows"
    Spec = NegateSpec
    observation_shape = "[C,n,W]"
    row_gram = 1.0

    @classmethod
    def check_spec(cls, spec, in_shape):
        if spec.rows > in_shape[1]:
            fail("operator.rows", f"{spec.rows} > H = {in_shape[1]}", f"at most {in_shape[1]}")
        w = np.ones(in_shape[0]) if spec.weights is None else array(spec.weights, "operator.weights")
        return {"rows": spec.rows, "weights": w}

    def __init__(self, in_shape, rows, weights):
        super().__init__(in_shape)
        self.rows, self.weights = rows, torch.as_tensor(weights, dtype=torch.float64)

    @property
    def obs_shape(self):
        return (self.in_shape[0], self.rows, self.in_shape[2])

    def forward(self, x):
        return -x[:, :, : self.rows] * self.weights.to(x).view(1, -1, 1, 1)


def test_a_new_kind_is_one_class_and_the_request_model_takes_it():
    from service.schemas import make_request_model
    op = NegateRows.from_spec({"kind": "negate_rows", "rows": 3}, SHAPE)
    assert op.obs_shape == (2, 3, 8) and NegateRows.Spec.array_fields() == ("weights",)
    with pytest.raises(OperatorSpecError, match="operator.rows: 9 > H = 8"):
        NegateRows.from_spec({"kind": "negate_rows", "rows": 9}, SHAPE)
    with pytest.raises(OperatorSpecError, match=r"unknown parameter\(s\) \['cols'\]"):
        NegateRows.from_spec({"kind": "negate_rows", "rows": 1, "cols": 2}, SHAPE)
    model = make_request_model({**OPERATORS, "negate_rows": NegateRows}, ["fast"])
    req = model.model_validate({"model": "m", "operator": {"kind": "negate_rows", "rows": 2,
                                                            "weights": {"npy": "AAAA"}}, "observation": [1.0]})
    assert isinstance(req.operator, NegateSpec)
    schema = model.model_json_schema()
    assert "NegateSpec" in schema["$defs"]
    assert schema["properties"]["operator"]["discriminator"]["mapping"]["negate_rows"].endswith("NegateSpec")


def test_spec_and_class_must_agree_on_the_kind():
    with pytest.raises(TypeError, match="kind"):
        type("Wrong", (LinearOperator,), {"kind": "other", "Spec": NegateSpec})
