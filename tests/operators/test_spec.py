"""Spec validation: every bad input is an OperatorSpecError saying what is expected; the wire
schemas the service derives; PDE blocks."""
import json
import math

import numpy as np
import pytest
import torch

from operators import (OPERATORS, Blur, CompressedSensing, DarcyResidual, HelmholtzResidual,
                       OperatorSpecError, UnknownKindError, build_operator, build_pde)
from service.api.operators import operator_schema

S1 = (1, 16, 16)
S2 = (2, 16, 16)
ONES = np.ones((16, 16))
NAN_MASK = ONES.copy()
NAN_MASK[3, 3] = np.nan

BAD = {
    # kind / structure
    "unknown kind": ({"kind": "deblur"}, S1, "expected one of"),
    "missing kind": ({"mask": ONES}, S1, "unknown kind"),
    "not an object": ("blur", S1, "expected an object"),
    "unknown parameter": ({"kind": "identity", "mask": ONES}, S1, "unknown parameter"),
    "bad in_shape": ({"kind": "identity"}, (16, 16), "in_shape"),
    # inpainting
    "mask wrong shape": ({"kind": "inpainting", "mask": np.ones((8, 8))}, S1, "[H,W]=[16,16]"),
    "mask wrong channels": ({"kind": "inpainting", "mask": np.ones((3, 16, 16))}, S2, "[C,H,W]=[2,16,16]"),
    "mask not binary": ({"kind": "inpainting", "mask": 0.5 * ONES}, S1, "binary"),
    "mask NaN": ({"kind": "inpainting", "mask": NAN_MASK}, S1, "NaN"),
    "mask ragged": ({"kind": "inpainting", "mask": [[1, 0], [1]]}, S1, "rectangular"),
    "mask strings": ({"kind": "inpainting", "mask": [["a", "b"]]}, S1, "non-numeric"),
    "mask undecoded": ({"kind": "inpainting", "mask": {"npy": "AAAA"}}, S1, "expected an array"),
    "mask missing": ({"kind": "inpainting"}, S1, "missing"),
    # sparse points
    "points out of range": ({"kind": "sparse_points", "points": [[0, 16, 0]]}, S1, "outside [0, 15]"),
    "points negative": ({"kind": "sparse_points", "points": [[0, 1, -1]]}, S1, "col -1"),
    "points channel": ({"kind": "sparse_points", "points": [[2, 1, 1]]}, S2, "channel"),
    "points not integer": ({"kind": "sparse_points", "points": [[0, 1.5, 2]]}, S1, "integer"),
    "points wrong shape": ({"kind": "sparse_points", "points": [[0, 1]]}, S1, "[N,3]"),
    "points empty": ({"kind": "sparse_points", "points": []}, S1, "[N,3]"),
    "points inf": ({"kind": "sparse_points", "points": [[0, 1, np.inf]]}, S1, "NaN or inf"),
    # blur
    "kernel even": ({"kind": "blur", "kernel": np.ones((4, 4))}, S1, "odd"),
    "kernel not square": ({"kind": "blur", "kernel": np.ones((3, 5))}, S1, "square"),
    "kernel 1-D": ({"kind": "blur", "kernel": [1, 2, 1]}, S1, "square"),
    "kernel NaN": ({"kind": "blur", "kernel": [[0, 1, 0], [1, np.nan, 1], [0, 1, 0]]}, S1, "NaN"),
    "kernel sum 0": ({"kind": "blur", "kernel": [[0, 1, 0], [1, -4, 1], [0, 1, 0]]}, S1, "sums to 0"),
    "kernel too big": ({"kind": "blur", "kernel": np.ones((17, 17))}, S1, "exceeds"),
    "two kernels": ({"kind": "blur", "kernel": np.ones((3, 3)), "gaussian": {"sigma": 1}}, S1, "exactly one"),
    "no kernel": ({"kind": "blur"}, S1, "exactly one"),
    "sigma zero": ({"kind": "blur", "gaussian": {"sigma": 0}}, S1, "> 0"),
    "sigma negative": ({"kind": "blur", "gaussian": {"sigma": -1, "size": 5}}, S1, "> 0"),
    "sigma NaN": ({"kind": "blur", "gaussian": {"sigma": math.nan}}, S1, "NaN"),
    "sigma string": ({"kind": "blur", "gaussian": {"sigma": "2"}}, S1, "expected a number"),
    "sigma missing": ({"kind": "blur", "gaussian": {"size": 5}}, S1, "missing"),
    "gaussian size even": ({"kind": "blur", "gaussian": {"sigma": 1, "size": 4}}, S1, "odd"),
    "gaussian default too big": ({"kind": "blur", "gaussian": {"sigma": 5}}, S1, "exceeds"),
    "gaussian not object": ({"kind": "blur", "gaussian": 2.0}, S1, "expected an object"),
    "motion size even": ({"kind": "blur", "motion": {"size": 6, "seed": 0}}, S1, "odd"),
    "motion seed negative": ({"kind": "blur", "motion": {"size": 5, "seed": -1}}, S1, ">= 0"),
    "motion seed fraction": ({"kind": "blur", "motion": {"size": 5, "seed": 1.5}}, S1, "integer"),
    "boundary": ({"kind": "blur", "kernel": np.ones((3, 3)), "boundary": "zero"}, S1, "reflect"),
    # super-resolution
    "factor not dividing": ({"kind": "super_resolution", "factor": 3}, S1, "expected one of [1, 2, 4, 8, 16]"),
    "factor zero": ({"kind": "super_resolution", "factor": 0}, S1, ">= 1"),
    "factor fraction": ({"kind": "super_resolution", "factor": 2.5}, S1, "integer"),
    "factor bool": ({"kind": "super_resolution", "factor": True}, S1, "expected a number"),
    "factor inf": ({"kind": "super_resolution", "factor": math.inf}, S1, "NaN or infinite"),
    # compressed sensing
    "m zero": ({"kind": "compressed_sensing", "m": 0}, S1, ">= 1"),
    "m too many": ({"kind": "compressed_sensing", "m": 257}, S1, "<= 256"),
    "m missing": ({"kind": "compressed_sensing", "seed": 1}, S1, "needs m"),
    "seed and matrix": ({"kind": "compressed_sensing", "seed": 1, "matrix": np.ones((4, 256))}, S1, "either"),
    "matrix shape": ({"kind": "compressed_sensing", "matrix": np.ones((4, 255))}, S1, "[m, 256]"),
    "matrix NaN": ({"kind": "compressed_sensing", "matrix": np.full((4, 256), np.nan)}, S1, "NaN"),
    "m vs matrix": ({"kind": "compressed_sensing", "m": 5, "matrix": np.ones((4, 256))}, S1, "4 rows"),
    "matrix too big": ({"kind": "compressed_sensing", "m": 1000}, (3, 256, 256), "limit"),
    # MRI
    "mri channels": ({"kind": "mri", "mask": ONES}, (3, 16, 16), "3 channels"),
    "mri mask shape": ({"kind": "mri", "mask": np.ones((2, 16, 16))}, S1, "[H,W]=[16,16]"),
    "mri mask binary": ({"kind": "mri", "mask": 2 * ONES}, S1, "binary"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_spec_raises_with_a_helpful_message(case):
    spec, shape, expect = BAD[case]
    with pytest.raises(OperatorSpecError) as err:
        build_operator(spec, shape)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert expect in msg, msg
    assert ";" in msg or "in_shape" in msg  # "<what was wrong>; expected <what instead>"
    assert len(msg) < 400  # never echoes the input back


def test_unknown_kind_is_its_own_error():
    with pytest.raises(UnknownKindError, match="blur"):
        build_operator({"kind": "Blur"}, S1)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_extra_parameter_rejected_for_every_kind(kind):
    with pytest.raises(OperatorSpecError, match="unknown parameter"):
        build_operator({"kind": kind, "bogus": 1}, S1)


def test_good_specs_in_every_accepted_form():
    mask = (np.arange(256).reshape(16, 16) % 3 == 0)
    assert build_operator({"kind": "inpainting", "mask": mask}, S1).mask.sum() == mask.sum()
    assert build_operator({"kind": "inpainting", "mask": mask.astype(int).tolist()}, S2).mask.shape == S2
    op = build_operator({"kind": "sparse_points", "points": [[1.0, 2.0, 3.0], [0, 15, 15]]}, S2)
    assert op.points.tolist() == [[1, 2, 3], [0, 15, 15]]
    op = build_operator({"kind": "blur", "gaussian": {"sigma": 1.2}, "boundary": "reflect"}, S1)
    assert isinstance(op, Blur) and op.kernel.shape == (9, 9) and op.boundary == "reflect"
    assert build_operator({"kind": "blur", "kernel": torch.ones(3, 3)}, S1).kernel.sum() == 9
    assert build_operator({"kind": "super_resolution", "factor": 4.0}, S1).obs_shape == (1, 4, 4)
    cs = build_operator({"kind": "compressed_sensing", "m": 256}, S1)
    assert isinstance(cs, CompressedSensing) and cs.obs_shape == (256,)
    assert torch.equal(cs.matrix, build_operator({"kind": "compressed_sensing", "m": 256, "seed": 0}, S1).matrix)
    cs = build_operator({"kind": "compressed_sensing", "m": 4, "matrix": np.ones((4, 256))}, S1)
    assert cs.obs_shape == (4,)
    assert build_operator({"kind": "mri", "mask": mask}, S2).obs_shape == (2, 16, 16)


def test_operators_copy_their_arrays():
    mask = np.ones((16, 16))
    kernel = np.ones((3, 3)) / 9
    inp = build_operator({"kind": "inpainting", "mask": mask}, S1)
    blur = build_operator({"kind": "blur", "kernel": kernel}, S1)
    x = torch.rand((1,) + S1, dtype=torch.float64)
    y0, y1 = inp(x), blur(x)
    mask[:] = 0
    kernel[:] = 0
    assert torch.equal(inp(x), y0) and torch.equal(blur(x), y1)


def test_schemas_for_every_kind():
    schemas = {kind: operator_schema(cls) for kind, cls in OPERATORS.items()}
    assert set(schemas) == set(OPERATORS)
    json.dumps(schemas)  # plain JSON
    for kind, s in schemas.items():
        assert s["$schema"].endswith("2020-12/schema") and s["type"] == "object"
        assert s["properties"]["kind"]["const"] == kind and "kind" in s["required"]
        assert s["additionalProperties"] is False and s["description"] and s["title"] == kind
        for name, prop in s["properties"].items():  # every parameter documented
            assert name == "kind" or prop.get("description"), (kind, name)
        for name in OPERATORS[kind].Spec.array_fields():  # arrays: a nested list or any encoding
            alternatives = s["properties"][name].get("anyOf", [])
            flat = json.dumps(alternatives)
            assert all(f'"{enc}"' in flat for enc in ("npy", "png", "tiff", "file")), (kind, name)
    assert {"mask"} <= set(schemas["inpainting"]["required"])
    assert set(schemas["blur"]["properties"]) == {"kind", "kernel", "gaussian", "motion", "boundary"}
    assert "Array" in schemas["sparse_points"]["properties"]["points"]["description"]
    assert set(schemas["compressed_sensing"]["properties"]) == {"kind", "m", "seed", "matrix"}
    assert len(schemas["blur"]["oneOf"]) == 3  # exactly one of kernel, gaussian, motion


# ----------------------------------------------------------------------------- PDE block
CARD = {"kind": "darcy", "f": 1.0, "h": 1 / 63, "bc": "dirichlet-zero"}


def test_build_pde_uses_card_defaults_and_overrides():
    op = build_pde({"kind": "darcy"}, (2, 64, 64), CARD)
    assert isinstance(op, DarcyResidual) and op.f == 1.0 and op.h == pytest.approx(1 / 63)
    assert build_pde({"kind": "darcy", "f": 2.0}, (2, 64, 64), CARD).f == 2.0
    assert build_pde({}, (2, 64, 64), CARD).kind == "darcy"  # kind defaults to the card's
    op = build_pde({"kind": "helmholtz", "k": 2.0, "channels": [1, 0]}, (2, 8, 8), {"kind": "helmholtz", "k": 1.0})
    assert isinstance(op, HelmholtzResidual) and op.k == 2.0 and op.channels == (1, 0)
    assert build_pde({"kind": "poisson"}, (2, 8, 8), {"kind": "poisson"}).kind == "poisson"


@pytest.mark.parametrize("spec,shape,card,expect", [
    ({"kind": "poisson"}, (2, 64, 64), CARD, "'darcy'"),
    ({"kind": "heat"}, (2, 64, 64), CARD, "unknown PDE"),
    ({"kind": "darcy"}, (1, 64, 64), None, "no PDE"),
    ({"kind": "darcy", "tau": 3}, (2, 64, 64), CARD, "unknown parameter"),
    ({"kind": "darcy", "f": math.nan}, (2, 64, 64), CARD, "NaN"),
    ({"kind": "darcy", "channels": [0, 0]}, (2, 64, 64), CARD, "same channel"),
    ({"kind": "darcy", "channels": [0, 2]}, (2, 64, 64), CARD, "<= 1"),
    ({"kind": "darcy", "channels": "au"}, (2, 64, 64), CARD, "two channel indices"),
    ({"kind": "helmholtz", "k": -1}, (2, 8, 8), {"kind": "helmholtz"}, ">= 0"),
    ({"kind": "darcy"}, (2, 64, 32), CARD, "N x N"),
    ({"kind": "darcy"}, (2, 32, 32), CARD, "h="),
    ("darcy", (2, 64, 64), CARD, "expected an object"),
])
def test_build_pde_errors(spec, shape, card, expect):
    with pytest.raises(OperatorSpecError) as err:
        build_pde(spec, shape, card)
    assert expect in str(err.value), str(err.value)
