"""Parallel-beam CT (``ct``): exact adjoint, geometry, filtered back-projection, spec checks."""
import math

import numpy as np
import pytest
import torch

from operators import CT, OPERATORS, Rescaled, batch_dot, build_operator
from operators.params import OperatorSpecError
from service.api.operators import operator_schema
from operators.tomography import detector_averaging, native_detectors


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def smooth_phantom(n: int) -> torch.Tensor:
    """Two Gaussian blobs inside the inscribed disc, ``[1, 1, n, n]``."""
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1) * 2 - 1
    img = np.exp(-((xx - 0.2) ** 2 + yy ** 2) / 0.1) + 0.5 * np.exp(-((xx + 0.3) ** 2 + (yy + 0.3) ** 2) / 0.05)
    return torch.as_tensor(img * (xx ** 2 + yy ** 2 < 0.9))[None, None]


ADJOINT_CASES = {
    "count, unit cells": ({"kind": "ct", "angles": 30}, (2, 16, 16)),
    "list, coarse cells": ({"kind": "ct", "angles": [0, 13.5, 45, 90, 91, 179.9, 270, -30], "detectors": 10},
                           (1, 16, 16)),
    "fine cells, odd size": ({"kind": "ct", "angles": 7, "detectors": 61}, (3, 15, 15)),
    "one angle": ({"kind": "ct", "angles": [33.3]}, (1, 9, 9)),
    "many angles in chunks": ({"kind": "ct", "angles": 700}, (1, 32, 32)),  # 247 angles per chunk: 3 chunks
}


@pytest.mark.parametrize("name", ADJOINT_CASES)
def test_adjoint_identity_float64(name):
    """<A x, y> = <x, A^T y> to 1e-10 relative (rounding only: the back-projection is the exact transpose)."""
    op = build_operator(*ADJOINT_CASES[name])
    x, y = randn((3,) + op.in_shape, 1), randn((3,) + tuple(op.obs_shape), 2)
    lhs, rhs = batch_dot(op.forward(x), y), batch_dot(x, op.adjoint(y))
    assert torch.all((lhs - rhs).abs() <= 1e-10 * lhs.abs()), (lhs, rhs)
    scale = op.forward(x).flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert torch.all((lhs - rhs).abs() <= 1e-13 * scale)


def test_chunks_agree_with_one_pass():
    op = build_operator({"kind": "ct", "angles": 700}, (1, 32, 32))
    assert len(op._radon(torch.zeros(1, dtype=torch.float64))) == 3  # 2^19 positions: 247 angles each
    one = CT((1, 32, 32), op.angles.numpy())
    one.chunk = 700
    x = randn((2, 1, 32, 32), 3)
    torch.testing.assert_close(op(x), one(x), rtol=0, atol=1e-12)


def test_dense_adjoint_is_the_transpose():
    op = build_operator({"kind": "ct", "angles": [0, 30, 100], "detectors": 7}, (1, 6, 6))
    n, m = 36, int(np.prod(op.obs_shape))
    a = op.forward(torch.eye(n, dtype=torch.float64).view(n, 1, 6, 6)).reshape(n, m).T
    at = op.adjoint(torch.eye(m, dtype=torch.float64).view((m,) + tuple(op.obs_shape))).reshape(m, n).T
    torch.testing.assert_close(at, a.T, rtol=0, atol=1e-13)


def test_float32_and_batches():
    op = build_operator({"kind": "ct", "angles": 12}, (2, 16, 16))
    x = randn((4, 2, 16, 16), 4, torch.float32)
    y = op(x)
    assert y.shape == (4, 2, 12, native_detectors(16)) and y.dtype == torch.float32
    assert op.adjoint(y).dtype == torch.float32 and op.pseudo_inverse(y).dtype == torch.float32
    torch.testing.assert_close(y.double(), op(x.double()), rtol=1e-5, atol=1e-4)
    # channels are projected independently (each channel's sinogram is its own)
    torch.testing.assert_close(op(x)[:, 1:], build_operator({"kind": "ct", "angles": 12}, (1, 16, 16))(x[:, 1:]))


# ----------------------------------------------------------------------------- geometry
def test_geometry_line_integrals_in_pixel_units():
    n = 8
    op = build_operator({"kind": "ct", "angles": [0, 90]}, (1, n, n))
    g = native_detectors(n)
    assert op.obs_shape == (1, 2, g) and g == 12
    ones = op(torch.ones((1, 1, n, n), dtype=torch.float64))[0, 0]
    pad = (g - n) // 2
    # a constant image of 1: n through every ray that crosses the image at 0 and 90 degrees
    torch.testing.assert_close(ones[:, pad:pad + n], torch.full((2, n), float(n), dtype=torch.float64))
    assert float(ones[:, :pad].abs().max()) < 1e-12 and float(ones[:, pad + n:].abs().max()) < 1e-12
    # an impulse at (row 1, col 6): at 0 degrees rays run down the columns (detector = column),
    # at 90 degrees the detectors run from the bottom row to the top row
    x = torch.zeros((1, 1, n, n), dtype=torch.float64)
    x[0, 0, 1, 6] = 1.0
    y = op(x)[0, 0]
    assert int(y[0].argmax()) == pad + 6 and int(y[1].argmax()) == g - 1 - (pad + 1)
    torch.testing.assert_close(y.sum(1), torch.ones(2, dtype=torch.float64))  # mass is kept


def test_detector_cells_average_the_unit_cells():
    r = detector_averaging(12, 5)
    torch.testing.assert_close(r.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(r.sum(0), torch.full((12,), 5 / 12, dtype=torch.float64))
    assert torch.equal(detector_averaging(12, 12), torch.eye(12, dtype=torch.float64))
    coarse = build_operator({"kind": "ct", "angles": 4, "detectors": 6}, (1, 8, 8))
    fine = build_operator({"kind": "ct", "angles": 4}, (1, 8, 8))
    x = randn((1, 1, 8, 8), 5)
    torch.testing.assert_close(coarse(x), fine(x).view(1, 1, 4, 6, 2).mean(-1))  # 12 unit cells -> 6 pairs


# ----------------------------------------------------------------------------- filtered back-projection
@pytest.mark.parametrize("angles,detectors,tol", [(180, None, 0.03), (60, None, 0.04), (180, 200, 0.04),
                                                  (180, 64, 0.08)])
def test_fbp_recovers_a_smooth_phantom(angles, detectors, tol):
    n = 64
    op = build_operator({"kind": "ct", "angles": angles, "detectors": detectors}, (1, n, n))
    x = smooth_phantom(n)
    rec = op.pseudo_inverse(op(x))
    err = float((rec - x).norm() / x.norm())
    assert err < tol, err
    # and the noise-free sinogram of the reconstruction is close to the data
    y = op(x)
    assert float((op(rec) - y).norm() / y.norm()) < tol


def test_fbp_in_network_space():
    """``Rescaled`` (the samplers' view) divides the FBP by the scale: channels are separable."""
    op = build_operator({"kind": "ct", "angles": 90}, (1, 32, 32))
    assert op.channel_separable and op.row_gram is None and op.svd() is None
    r = Rescaled(op, torch.tensor([0.5]), torch.tensor([2.0]))
    x = smooth_phantom(32)
    y = r.observation(op(0.5 + 2.0 * x))  # what the sampler sees: y - A(shift)
    assert float((r.pseudo_inverse(y) - x).norm() / x.norm()) < 0.05


def test_prox_is_the_dense_closed_form():
    op = build_operator({"kind": "ct", "angles": [0, 50, 120], "detectors": 8}, (1, 6, 6))
    a = op.forward(torch.eye(36, dtype=torch.float64).view(36, 1, 6, 6)).reshape(36, -1).T
    z, y = randn((2, 1, 6, 6), 6), randn((2,) + tuple(op.obs_shape), 7)
    rho = 0.3
    want = torch.linalg.solve(a.T @ a + rho * torch.eye(36, dtype=torch.float64),
                              (a.T @ y.flatten(1).T + rho * z.flatten(1).T)).T.reshape(z.shape)
    assert float((op.prox(z, y, rho) - want).norm() / want.norm()) < 1e-5


# ----------------------------------------------------------------------------- spec
def test_spec_forms():
    assert OPERATORS["ct"] is CT and CT.observation_shape == "[C,angles,detectors]"
    op = build_operator({"kind": "ct", "angles": 4.0}, (1, 10, 10))
    assert op.angles.tolist() == [0.0, 45.0, 90.0, 135.0] and op.detectors == native_detectors(10) == 15
    op = build_operator({"kind": "ct", "angles": np.array([10, 20]), "detectors": 9.0}, (3, 10, 10))
    assert op.angles.tolist() == [10.0, 20.0] and op.obs_shape == (3, 2, 9)
    schema = operator_schema(CT)
    assert schema["required"] == ["kind", "angles"] and schema["additionalProperties"] is False
    assert {a["type"] for a in schema["properties"]["angles"]["anyOf"]} == {"integer", "array"}
    assert CT.Spec.array_fields() == ()  # angles is a parameter list, not a decoded array


@pytest.mark.parametrize("spec,shape,expect", [
    ({"kind": "ct"}, (1, 8, 8), "missing parameter(s) ['angles']"),
    ({"kind": "ct", "angles": 0}, (1, 8, 8), ">= 1"),
    ({"kind": "ct", "angles": 2.5}, (1, 8, 8), "not a count"),
    ({"kind": "ct", "angles": True}, (1, 8, 8), "expected a count"),
    ({"kind": "ct", "angles": []}, (1, 8, 8), "1..4096"),
    ({"kind": "ct", "angles": [[0, 1]]}, (1, 8, 8), "flat list"),
    ({"kind": "ct", "angles": [0, math.nan]}, (1, 8, 8), "NaN"),
    ({"kind": "ct", "angles": [0, "x"]}, (1, 8, 8), "expected a number"),
    ({"kind": "ct", "angles": 10**6}, (1, 8, 8), "1..4096"),
    ({"kind": "ct", "angles": "90"}, (1, 8, 8), "expected a count"),
    ({"kind": "ct", "angles": 4, "detectors": 0}, (1, 8, 8), ">= 1"),
    ({"kind": "ct", "angles": 4, "detectors": 49}, (1, 8, 8), "at most 48"),
    ({"kind": "ct", "angles": 4, "pixels": 3}, (1, 8, 8), "unknown parameter(s) ['pixels']"),
    ({"kind": "ct", "angles": 4}, (1, 8, 12), "square"),
    ({"kind": "ct", "angles": 4000}, (1, 256, 256), "at most 127 angles"),
])
def test_bad_specs(spec, shape, expect):
    with pytest.raises(OperatorSpecError) as err:
        build_operator(spec, shape)
    msg = str(err.value)
    assert expect in msg and ";" in msg and msg.startswith("operator"), msg
