"""A fixed-size prior on images of any size: the denoiser run on tiles of its native size.

Patch-based diffusion (Wang et al., Patch Diffusion, 2023; Hu et al., 2024): at each call the
image is cut into a grid of non-overlapping native-size tiles, the grid shifted by an offset
drawn afresh for every noise level, each tile denoised on its own, and the tiles put back. The
offset changes from step to step, so no tile border stays in one place long enough to leave a
seam. Edges: the image is reflect-padded to cover the shifted grid, and the padding cropped.

The offset is a function of the noise level (not a stateful generator), so a run is
reproducible, and every row of a batch at one level shares one grid. Tiles go through the
network ``chunk`` at a time: memory is bounded whatever the image size.
"""
from __future__ import annotations

import hashlib
import math
import struct

import torch
import torch.nn.functional as F

from .denoiser import Denoiser, sigma_batch


def grid_offset(sigma: float, tile: tuple[int, int]) -> tuple[int, int]:
    """The grid's shift at noise level ``sigma``: a seeded draw in ``[0, tile)`` per axis."""
    seed = int.from_bytes(hashlib.sha256(struct.pack("<d", float(sigma))).digest()[:4], "little")
    g = torch.Generator().manual_seed(seed)
    return tuple(int(torch.randint(0, t, (1,), generator=g)) for t in tile)


def tile_count(shape: tuple[int, int], tile: tuple[int, int]) -> int:
    """Tiles per network pass over an image of ``shape`` at most (a grid shifted by up to ``t - 1``
    covers ``ceil((s + t - 1) / t)`` tiles per axis): the admission cost of a pass, in tiles."""
    return math.prod((s + 2 * t - 2) // t for s, t in zip(shape, tile))


class TiledDenoiser(Denoiser):
    """``inner`` (native size ``inner.shape``) applied to ``[B, C, H, W]`` images with ``H, W`` at
    least the native size, tile by tile (module docstring)."""

    def __init__(self, inner: Denoiser, shape, chunk: int = 64):
        super().__init__()
        self.inner, self.shape, self.chunk = inner, tuple(int(s) for s in shape), int(chunk)
        self.tile = tuple(int(s) for s in inner.shape[1:])
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.sigma_data = getattr(inner, "sigma_data", 0.5)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.tile:
            return self.inner(x, sigma)
        s = sigma_batch(sigma, x)
        levels = torch.unique(s)
        if len(levels) > 1:  # rows at several levels: one grid per level
            out = torch.empty_like(x)
            for lv in levels:
                rows = s == lv
                out[rows] = self._tiled(x[rows], float(lv))
            return out
        return self._tiled(x, float(levels[0]))

    def _tiled(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        (th, tw), (h, w) = self.tile, x.shape[-2:]
        oy, ox = grid_offset(sigma, self.tile)
        ny, nx = (oy + h + th - 1) // th, (ox + w + tw - 1) // tw  # tiles covering the shifted image
        pad = (ox, nx * tw - w - ox, oy, ny * th - h - oy)
        xp = F.pad(x, pad, mode="reflect")  # each pad < the tile <= the image: reflect is defined
        b, c = x.shape[:2]
        tiles = (xp.reshape(b, c, ny, th, nx, tw).permute(0, 2, 4, 1, 3, 5).reshape(b * ny * nx, c, th, tw))
        out = torch.cat([self.inner(t, sigma) for t in tiles.split(self.chunk)])
        out = out.reshape(b, ny, nx, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ny * th, nx * tw)
        return out[..., oy:oy + h, ox:ox + w]
