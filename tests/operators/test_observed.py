"""Entries an operator never produces carry no information: ``observed`` zeroes them."""
import torch

from operators.blur import Blur
from operators.imaging import Inpainting
from operators.sensing import MRI


def test_observed_zeroes_what_the_operator_never_produces():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand((8, 8), generator=g) < 0.5).double()
    for op in (Inpainting((1, 8, 8), mask), MRI((1, 8, 8), mask)):
        y = torch.randn((2,) + op.obs_shape, generator=g, dtype=torch.float64)
        x = torch.randn((2,) + op.in_shape, generator=g, dtype=torch.float64)
        yo = op.observed(y)
        assert torch.equal(op.observed(op.forward(x)), op.forward(x))  # nothing lost from real data
        assert float((yo - y).abs().sum()) > 0  # garbage in unobserved entries removed
        assert torch.equal(op.adjoint(yo), op.adjoint(y))  # and it carried no information
    blur = Blur((1, 8, 8), gaussian={"sigma": 1.0, "size": 3})
    y = torch.randn((1, 1, 8, 8), generator=g, dtype=torch.float64)
    assert torch.equal(blur.observed(y), y)
