"""The ``svd()`` contract, for every kind that offers one: ``A = U diag(s) V^T`` with ``V`` orthonormal."""
import pytest
import torch

from operators import Rescaled
from tests.helpers.operators import CASES, op_for, randn

WITH_SVD = [n for n in CASES if op_for(n).svd() is not None]


def norm(t):
    return t.flatten(1).abs().square().sum(1).sqrt()


def test_some_kinds_have_an_svd():
    assert "inpainting-hw" in WITH_SVD and "blur-kernel-circular" in WITH_SVD


@pytest.mark.parametrize("name", WITH_SVD)
def test_svd_contract(name):
    op = op_for(name)
    svd = op.svd()
    x = randn((3,) + op.in_shape, 30)
    c = svd.vt(x)
    assert torch.allclose(norm(c), norm(x), rtol=1e-12)  # V^T keeps norms
    assert torch.allclose(svd.v(c).real, x, atol=1e-12)  # V V^T = I
    s = svd.s.to(x.device)
    assert torch.allclose(svd.ut(op(x)), s * c, atol=1e-12)  # U^T A = diag(s) V^T
    assert torch.allclose(svd.v(s**2 * c).real, op.normal(x), atol=1e-12)  # A^T A = V diag(s^2) V^T


@pytest.mark.parametrize("name", WITH_SVD)
def test_rescaled_svd_with_one_scale(name):
    op = op_for(name)
    c = op.in_shape[0]
    r = Rescaled(op, torch.zeros(c), torch.full((c,), 3.0))
    x = randn((2,) + op.in_shape, 31)
    assert torch.allclose(r.svd().ut(r(x)), r.svd().s * r.svd().vt(x), atol=1e-12)
