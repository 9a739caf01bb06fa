"""``result.png`` of a volume: a montage of its slices, or one slice (``?slice=k``).

The montage has three panels side by side, each a grid of the slices in order (row by row,
``ceil(sqrt(D))`` columns): the observation (``A^+ y`` per slice where the observation is not
an image), the mean (in the card's value range), and the std (one colour scale for every
slice, with its colour bar). One slice is drawn as a single image's result is
(``render.render_png``).
"""
from __future__ import annotations

import math

import numpy as np

from .render import _blank, _grid, _png, colormap, gray, render_png
from .stack import SLICE_RE, pick_slice

#: The montage's tiles are at least this many pixels on a side (small slices are enlarged).
MIN_TILE = 32


def tile(panels: list[np.ndarray]) -> np.ndarray:
    """``[H, W, 3]`` uint8 panels in a grid of ``ceil(sqrt(D))`` columns, one pixel apart."""
    d = len(panels)
    h, w = panels[0].shape[:2]
    scale = max(1, math.ceil(MIN_TILE / max(1, min(h, w))))
    panels = [np.repeat(np.repeat(p, scale, 0), scale, 1) for p in panels]
    h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(d))
    rows = math.ceil(d / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for k, p in enumerate(panels):
        r, c = divmod(k, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = p
    return out


def _value_range(card: dict, mean: np.ndarray) -> tuple[float, float]:
    vr = card.get("value_range")
    if isinstance(vr, (list, tuple)) and len(vr) == 2 and all(isinstance(v, (int, float)) for v in vr):
        return float(vr[0]), float(vr[1])
    return float(mean.min()), float(mean.max())


def montage_png(card: dict, res) -> bytes:
    """The montage of a volume result (``samples`` ``[K, D, C, H, W]``): channel 0, or RGB."""
    mean = res.mean.astype(np.float64)  # [D, C, H, W]
    d, c, h, w = mean.shape
    lo, hi = _value_range(card, mean)
    img = (lambda a: gray(a if c == 3 else a[0], lo, hi))
    obs = res.observation_view
    row = [tile([img(o) for o in obs]) if obs is not None else tile([_blank(h, w)] * d),
           tile([img(m) for m in mean])]
    bars = {}
    if res.std is not None:
        std = res.std.astype(np.float64)
        s = np.sqrt(np.square(std).mean(1)) if c == 3 else std[:, 0]
        top = float(s.max())
        row.append(tile([colormap(x, 0.0, top) for x in s]))
        bars[(0, 2)] = (0.0, top)
    else:
        row.append(tile([_blank(h, w)] * d))
    labels = [f"observation ({d} slices, row by row)", "mean", "std"]
    return _png(_grid([row], labels, bars))


def chosen(res, slice_param: str | None):
    """The result to draw: ``res``, or its slice ``?slice=k`` (422 for a bad ``k``, or for
    ``slice`` on a result without slices)."""
    if slice_param is None:
        return res
    k = int(slice_param) if SLICE_RE.fullmatch(slice_param.strip()) else None
    return pick_slice(res, k)


def volume_png(card: dict, res) -> bytes:
    """``result.png``: a single image's picture (``render_png``), or a volume's montage."""
    return montage_png(card, res) if res.samples.ndim == 5 else render_png(card, res)
