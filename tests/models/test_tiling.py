"""A fixed-size prior on larger images (``models/tiling.py``): exact where the inner denoiser is
pixelwise, the grid moves with the noise level, chunks change nothing, the cost is what it says."""
import torch

from models.denoiser import Denoiser, sigma_batch
from models.tiling import TiledDenoiser, grid_offset, tile_count


class Pixelwise(Denoiser):
    """``D(x, s) = x / (1 + s^2) + s``: no pixel depends on another, so tiling must not show."""

    def __init__(self, shape=(1, 8, 8)):
        super().__init__()
        self.shape, self.calls, self.rows = tuple(shape), 0, 0

    def forward(self, x, sigma):
        assert tuple(x.shape[-2:]) == self.shape[1:], "the inner network only ever sees its native size"
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        s = sigma_batch(sigma, x).view(-1, 1, 1, 1).to(x)
        return x / (1 + s ** 2) + s


class Blurry(Pixelwise):
    """A denoiser that mixes neighbours (a 3 x 3 mean), for chunking and seams."""

    def forward(self, x, sigma):
        super().forward(x, sigma)
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def test_pixelwise_inner_is_exact_at_any_size_and_level():
    inner = Pixelwise()
    tiled = TiledDenoiser(inner, (1, 29, 19))
    x = torch.randn(3, 1, 29, 19, dtype=torch.float64)
    for sigma in (0.01, 0.7, torch.tensor([0.5, 2.0, 0.5])):
        s = sigma_batch(sigma, x).view(-1, 1, 1, 1)
        assert torch.allclose(tiled(x, sigma), x / (1 + s ** 2) + s, atol=0, rtol=0)


def test_native_size_is_passed_through():
    inner = Pixelwise()
    x = torch.randn(2, 1, 8, 8)
    TiledDenoiser(inner, (1, 8, 8))(x, 1.0)
    assert inner.calls == 1 and inner.rows == 2


def test_the_grid_moves_with_the_level_and_is_reproducible():
    offsets = {grid_offset(s, (64, 64)) for s in torch.linspace(0.01, 80, 30).tolist()}
    assert len(offsets) > 20  # nearly every level its own grid
    assert all(0 <= o < 64 for pair in offsets for o in pair)
    assert grid_offset(0.5, (64, 64)) == grid_offset(0.5, (64, 64))


def test_chunks_change_nothing_and_the_cost_counts_every_tile():
    x = torch.randn(2, 1, 30, 21, dtype=torch.float64)
    one, many = Blurry(), Blurry()
    a = TiledDenoiser(one, (1, 30, 21), chunk=3)(x, 0.3)
    b = TiledDenoiser(many, (1, 30, 21), chunk=1000)(x, 0.3)
    assert torch.equal(a, b) and many.calls == 1 and one.calls > 1
    assert one.rows == many.rows <= 2 * tile_count((30, 21), (8, 8))


def test_a_mixing_denoiser_changes_with_the_grid():
    """Tile borders move with the level: the same input at two levels sees two different grids."""
    x = torch.randn(1, 1, 24, 24, dtype=torch.float64)
    d = TiledDenoiser(Blurry(), (1, 24, 24))
    a, b = d(x, 0.11), d(x, 0.37)
    assert grid_offset(0.11, (8, 8)) != grid_offset(0.37, (8, 8)) and not torch.equal(a, b)
