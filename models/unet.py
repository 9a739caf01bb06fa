"""A compact U-Net for small multi-channel fields (32-128 px, 1-4 channels).

Residual blocks with GroupNorm and SiLU, the noise level enters through a
positional embedding of ``c_noise`` added inside each block (DDPM / EDM style),
optional self-attention at the coarsest level. Sized for CPU training.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (transformer style)."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        self.dim, self.max_positions = dim, max_positions

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_positions) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        a = t.float()[:, None] * 1000.0 * freqs[None]  # c_noise is O(1): spread it out
        return torch.cat([a.cos(), a.sin()], dim=1).to(t.dtype)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout * 2)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # adaptive GroupNorm
        h = F.silu(self.n2(h) * (1 + scale) + shift)
        return self.skip(x) + self.c2(self.drop(h))


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.norm, self.qkv, self.out, self.heads = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1), heads
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``net(x, c_noise) -> F`` with ``x: [B, C, H, W]`` and ``c_noise: [B]``.

    ``channel_mult`` gives the width of each level relative to ``base``; H and W must
    be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base: int = 32,
                 channel_mult=(1, 2, 2, 2), blocks_per_level: int = 1, attention: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        emb_dim = base * 4
        self.embed = nn.Sequential(PositionalEmbedding(base), nn.Linear(base, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(in_channels, base, 3, padding=1)
        chans = [base * m for m in channel_mult]
        self.down, self.pool = nn.ModuleList(), nn.ModuleList()
        skips, c = [], base
        for i, ch in enumerate(chans):
            level = nn.ModuleList()
            for _ in range(blocks_per_level):
                level.append(ResBlock(c, ch, emb_dim, dropout))
                c = ch
            self.down.append(level)
            skips.append(c)
            self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(chans) - 1 else nn.Identity())
        self.mid1 = ResBlock(c, c, emb_dim, dropout)
        self.mid_attn = Attention(c) if attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim, dropout)
        self.up = nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            level = nn.ModuleList()
            for j in range(blocks_per_level):
                level.append(ResBlock(c + (skips[i] if j == 0 else 0), ch, emb_dim, dropout))
                c = ch
            self.up.append(level)
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, c_noise):
        emb = self.embed(c_noise)
        h = self.inp(x)
        skips = []
        for level, pool in zip(self.down, self.pool):
            for blk in level:
                h = blk(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)
            for blk in level:
                h = blk(h, emb)
        return self.out(h)


ARCHITECTURES = {"unet": UNet}
