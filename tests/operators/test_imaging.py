"""Imaging operators: adjointness, data consistency, closed forms against dense algebra, conventions."""
import numpy as np
import pytest
import scipy.signal
import torch

import deepinv
import deepinv.physics.functional as dF
from operators import (OPERATORS, LinearOperator, batch_dot, build_operator, gaussian_kernel,
                       motion_kernel)
from tests.helpers.operators import (ASYM, CASES, CS_MATRIX, KMASK, MASK_CHW, MASK_HW, POINTS_DUP, SHAPE, op_for,
                                    randn)

#: Pseudo-inverse by the base class's CG (no closed form).
CG_PINV = {"blur-kernel-reflect", "blur-motion-reflect"}
#: Approximate pseudo-inverse (filtered back-projection): ``project`` only shrinks the misfit of
#: these white-noise images, by at least this factor (5 angles: a poor FBP); tests/operators/test_ct.py
#: has its accuracy on smooth images.
APPROX_PINV = {"ct": 0.5, "ct-cells": 0.95}
def rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def test_every_kind_is_covered():
    assert {spec["kind"] for spec, _ in CASES.values()} == set(OPERATORS)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes(name, dtype):
    op = op_for(name)
    assert op.linear and isinstance(op, LinearOperator) and op.kind == CASES[name][0]["kind"]
    x = randn((3,) + op.in_shape, 0, dtype)
    y = op(x)  # __call__ dispatches to the subclass's forward
    assert y.shape == (3,) + tuple(op.obs_shape) and y.dtype == dtype
    for out in (op.adjoint(y), op.pseudo_inverse(y), op.project(x, y), op.prox(x, y, 0.5)):
        assert out.shape == x.shape and out.dtype == dtype


@pytest.mark.parametrize("name", CASES)
def test_adjoint_identity(name):
    op = op_for(name)
    x = randn((3,) + op.in_shape, 1)
    y = randn((3,) + tuple(op.obs_shape), 2)
    lhs, rhs = batch_dot(op.forward(x), y), batch_dot(x, op.adjoint(y))
    assert torch.all((lhs - rhs).abs() <= 1e-5 * lhs.abs())
    scale = op.forward(x).flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    assert torch.all((lhs - rhs).abs() <= 1e-12 * scale)


@pytest.mark.parametrize("name", CASES)
def test_project_consistency(name):
    op = op_for(name)
    x_true, x = randn((3,) + op.in_shape, 3), randn((3,) + op.in_shape, 4)
    y = op(x_true)
    err = (op(op.project(x, y)) - y).flatten(1).norm(dim=1)
    if name in APPROX_PINV:
        assert torch.all(err <= APPROX_PINV[name] * (y - op(x)).flatten(1).norm(dim=1))
        return
    if name in CG_PINV:  # CG's guarantee: residual <= 1e-6 of its right-hand side y - A x
        assert torch.all(err <= 1e-6 * (y - op(x)).flatten(1).norm(dim=1))
    else:
        assert torch.all(err <= 1e-6 * y.flatten(1).norm(dim=1))
    assert rel(op(op.project(torch.zeros_like(x), y)), y) <= 1e-6


@pytest.mark.parametrize("name", [n for n in CASES if op_for(n).row_gram is not None])
def test_row_gram(name):
    op = op_for(name)
    y = op(randn((3,) + op.in_shape, 5))  # in the range (masked where A is a selection)
    assert rel(op(op.adjoint(y)), op.row_gram * y) <= 1e-12


def test_row_gram_declared():
    expect = {"identity": 1.0, "inpainting-hw": 1.0, "inpainting-chw": 1.0, "sparse-unique": 1.0, "sr2": 0.25,
              "sr4": 1 / 16, "mri-complex": 1.0}
    for name in CASES:
        assert op_for(name).row_gram == expect.get(name), name


# ----------------------------------------------------------------------------- dense checks
TINY = {
    "identity": ({"kind": "identity"}, (1, 8, 8)),
    "inpainting": ({"kind": "inpainting", "mask": MASK_HW[:8, :8]}, (1, 8, 8)),
    "sparse-dup": ({"kind": "sparse_points",
                    "points": [[0, 1, 2], [0, 1, 2], [0, 5, 7], [0, 0, 0], [0, 1, 2], [0, 3, 3]]}, (1, 8, 8)),
    "blur-circular": ({"kind": "blur", "kernel": ASYM}, (1, 8, 8)),
    "blur-gauss-reflect": ({"kind": "blur", "gaussian": {"sigma": 0.8, "size": 3}, "boundary": "reflect"},
                           (1, 8, 8)),
    "blur-reflect": ({"kind": "blur", "kernel": ASYM, "boundary": "reflect"}, (1, 8, 8)),
    "sr2": ({"kind": "super_resolution", "factor": 2}, (1, 8, 8)),
    "cs": ({"kind": "compressed_sensing", "m": 20, "seed": 0}, (1, 8, 8)),
    "mri-real": ({"kind": "mri", "mask": KMASK[:8, :8]}, (1, 8, 8)),
    "mri-complex": ({"kind": "mri", "mask": KMASK[:8, :8]}, (2, 8, 8)),
}
TINY_CG_PINV = {"blur-reflect"}
TINY_CG_PROX = {"blur-reflect", "blur-gauss-reflect", "cs"}


def dense(op):
    """``[m, n]`` matrix of ``op`` from its action on the basis vectors."""
    n = int(np.prod(op.in_shape))
    basis = torch.eye(n, dtype=torch.float64).view((n,) + op.in_shape)
    return op.forward(basis).reshape(n, -1).T


@pytest.mark.parametrize("name", TINY)
def test_pseudo_inverse_is_dense_pinv(name):
    op = build_operator(*TINY[name])
    a = dense(op)
    y = randn((3,) + tuple(op.obs_shape), 6)
    if name in TINY_CG_PINV:  # CG reaches A A^+ y = y only for y in the range
        y = op(randn((3,) + op.in_shape, 7))
    want = (torch.linalg.pinv(a) @ y.flatten(1).T).T.reshape((3,) + op.in_shape)
    tol = 1e-5 if name in TINY_CG_PINV else 1e-9
    assert rel(op.pseudo_inverse(y), want) <= tol


@pytest.mark.parametrize("name", TINY)
def test_prox_is_dense_closed_form(name):
    op = build_operator(*TINY[name])
    a = dense(op)
    n = a.shape[1]
    z, y = randn((3,) + op.in_shape, 8), randn((3,) + tuple(op.obs_shape), 9)
    tol = 1e-5 if name in TINY_CG_PROX else 1e-9
    for rho in (0.3, torch.tensor([0.05, 1.0, 7.0], dtype=torch.float64)):
        r = torch.as_tensor(rho, dtype=torch.float64).expand(3)
        want = torch.stack([
            torch.linalg.solve(a.T @ a + r[b] * torch.eye(n, dtype=torch.float64),
                               a.T @ y[b].flatten() + r[b] * z[b].flatten())
            for b in range(3)]).view(z.shape)
        assert rel(op.prox(z, y, rho), want) <= tol


# ----------------------------------------------------------------------------- blur conventions
@pytest.mark.parametrize("boundary", ["circular", "reflect"])
def test_blur_impulse_response_is_kernel(boundary):
    op = build_operator({"kind": "blur", "kernel": ASYM, "boundary": boundary}, SHAPE)
    x = torch.zeros((1,) + SHAPE, dtype=torch.float64)
    x[:, :, 8, 6] = 1.0
    y = op(x)
    for c in range(2):
        assert torch.allclose(y[0, c, 6:11, 4:9], torch.as_tensor(ASYM), atol=1e-14)
        assert y[0, c].sum().item() == pytest.approx(1.0)


def test_blur_circular_matches_scipy_convolve_wrap():
    x = randn((2,) + SHAPE, 10)
    y = build_operator({"kind": "blur", "kernel": ASYM}, SHAPE)(x)
    for b in range(2):
        for c in range(2):
            want = scipy.signal.convolve2d(x[b, c].numpy(), ASYM, mode="same", boundary="wrap")
            np.testing.assert_allclose(y[b, c].numpy(), want, atol=1e-13)


def test_blur_reflect_matches_numpy_reflect_pad_then_valid_convolution():
    x = randn((1,) + SHAPE, 11)
    y = build_operator({"kind": "blur", "kernel": ASYM, "boundary": "reflect"}, SHAPE)(x)
    for c in range(2):
        padded = np.pad(x[0, c].numpy(), 2, mode="reflect")
        want = scipy.signal.convolve2d(padded, ASYM, mode="valid")
        np.testing.assert_allclose(y[0, c].numpy(), want, atol=1e-13)


@pytest.mark.parametrize("boundary", ["circular", "reflect"])
def test_blur_matches_deepinv(boundary):
    op = build_operator({"kind": "blur", "kernel": ASYM, "boundary": boundary}, SHAPE)
    x, y = randn((3,) + SHAPE, 12), randn((3,) + SHAPE, 13)
    k = torch.as_tensor(ASYM)[None, None]
    assert torch.allclose(op(x), dF.conv2d(x, k, padding=boundary), atol=1e-13)
    assert torch.allclose(op.adjoint(y), dF.conv_transpose2d(y, k, padding=boundary), atol=1e-13)


def test_blur_kernels():
    g = gaussian_kernel(1.5, 9)
    assert g.sum() == pytest.approx(1.0) and np.allclose(g, g.T) and np.allclose(g, g[::-1])
    assert g.argmax() == 40  # the centre
    m0, m0b, m1 = motion_kernel(9, 0), motion_kernel(9, 0), motion_kernel(9, 1)
    assert np.array_equal(m0, m0b) and not np.array_equal(m0, m1)
    assert m0.shape == (9, 9) and m0.min() >= 0 and m0.sum() == pytest.approx(1.0, abs=1e-12)
    op = build_operator({"kind": "blur", "gaussian": {"sigma": 1.0}}, (1, 16, 16))
    assert op.kernel.shape == (7, 7)  # default size 2 ceil(3 sigma) + 1


def test_blur_circular_pseudo_inverse_cuts_zero_frequencies():
    box = np.ones((3, 3)) / 9  # zero response at frequency 1/3 on a 12-periodic grid
    op = build_operator({"kind": "blur", "kernel": box}, (1, 12, 12))
    y = randn((2, 1, 12, 12), 14)
    x = op.pseudo_inverse(y)
    assert torch.isfinite(x).all()
    a = dense(op)
    want = (torch.linalg.pinv(a, rtol=1e-10) @ y.flatten(1).T).T.reshape(x.shape)
    assert rel(x, want) <= 1e-9


# ----------------------------------------------------------------------------- other kinds
def test_super_resolution_is_block_mean_and_nearest_adjoint():
    op = op_for("sr4")
    x = randn((2,) + SHAPE, 15)
    want = x.numpy().reshape(2, 2, 4, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(op(x).numpy(), want, atol=1e-14)
    y = op(x)
    assert torch.equal(op.adjoint(y)[:, :, 5, 7], y[:, :, 1, 1] / 16)


def test_mri_is_masked_orthonormal_fft():
    x = randn((2, 1, 16, 12), 16)
    k = np.fft.fft2(x[:, 0].numpy(), norm="ortho") * KMASK
    y = op_for("mri-real")(x).numpy()
    np.testing.assert_allclose(y[:, 0] + 1j * y[:, 1], k, atol=1e-13)
    xc = randn((2, 2, 16, 12), 17)
    kc = np.fft.fft2(xc[:, 0].numpy() + 1j * xc[:, 1].numpy(), norm="ortho") * KMASK
    yc = op_for("mri-complex")(xc).numpy()
    np.testing.assert_allclose(yc[:, 0] + 1j * yc[:, 1], kc, atol=1e-13)
    assert op_for("mri-real").channel_separable and not op_for("mri-complex").channel_separable


def test_compressed_sensing_matrix():
    a = build_operator({"kind": "compressed_sensing", "m": 100, "seed": 3}, SHAPE)
    b = build_operator({"kind": "compressed_sensing", "m": 100, "seed": 4}, SHAPE)
    assert torch.equal(a.matrix, op_for("cs-seed").matrix) and not torch.equal(a.matrix, b.matrix)
    assert a.matrix.shape == (100, 384) and a.matrix.var().item() == pytest.approx(1 / 100, rel=0.05)
    assert not a.channel_separable
    same = deepinv.physics.CompressedSensing(m=100, img_size=SHAPE, rng=torch.Generator().manual_seed(3))
    assert torch.equal(same._A.double(), a.matrix)  # the same draw as deepinv's
    x = randn((2,) + SHAPE, 18)
    want = x.flatten(1).numpy() @ CS_MATRIX.T
    np.testing.assert_allclose(op_for("cs-matrix")(x).numpy(), want, atol=1e-12)


def test_sparse_points_duplicates_add_in_adjoint():
    op = op_for("sparse-dup")
    c, r, w = POINTS_DUP[0]
    count = int((POINTS_DUP == POINTS_DUP[0]).all(1).sum())
    assert count >= 2
    y = torch.ones((1, len(POINTS_DUP)), dtype=torch.float64)
    assert op.adjoint(y)[0, c, r, w].item() == count
    assert op.adjoint(y).sum().item() == len(POINTS_DUP)
    x = randn((1,) + SHAPE, 19)
    assert torch.equal(op(x)[0], x[0, POINTS_DUP[:, 0], POINTS_DUP[:, 1], POINTS_DUP[:, 2]])


def test_inpainting_project_replaces_observed_entries():
    op = op_for("inpainting-chw")
    x, y = randn((2,) + SHAPE, 20), randn((2,) + SHAPE, 21)
    m = torch.as_tensor(MASK_CHW).bool().expand_as(x)
    p = op.project(x, y)
    assert torch.equal(p[m], y[m]) and torch.equal(p[~m], x[~m])
    assert torch.equal(op(y)[~m], torch.zeros_like(y[~m]))
