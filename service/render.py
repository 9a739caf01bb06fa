"""``GET /v1/jobs/{id}/result.png``: observation, mean and std side by side.

Image models: one row (gray or RGB) with the observation (or ``A^+ y`` when the observation is
not an image), the mean in the card's value range and the std in a colormap (for RGB, the
root-mean-square over the three channels' stds). PDE models and other channel counts: one row
per channel, each field in a colormap scaled to the mean's range. Every colormapped panel has a
colour bar under it labelled with the values at its two ends.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# viridis at 6 anchors (enough for a readable ramp)
_ANCHORS = np.array([[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81],
                     [253, 231, 37]], dtype=np.float64)
GAP, HEADER, MIN_SIDE = 4, 14, 128
#: Colour bar under a colormapped panel: bar height, then a line of text (its end values).
BAR_H, BAR_TEXT = 8, 12


def colormap(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[H, W]`` -> ``[H, W, 3]`` uint8 viridis-like."""
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(int), len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).round().astype(np.uint8)


def gray(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[H, W]`` or ``[3, H, W]`` -> ``[H, W, 3]`` uint8."""
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    t = (t * 255).round().astype(np.uint8)
    return np.repeat(t[..., None], 3, -1) if t.ndim == 2 else np.moveaxis(t, 0, -1)


def _blank(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 40, dtype=np.uint8)


def _label(v: float) -> str:
    return f"{v:.3g}"


def _colorbar(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, width: int,
              lo: float, hi: float) -> None:
    """A horizontal viridis ramp ``width`` px wide at ``(x, y)``, its end values under its ends."""
    ramp = colormap(np.tile(np.linspace(0.0, 1.0, max(width, 2))[None], (BAR_H, 1)), 0.0, 1.0)
    canvas.paste(Image.fromarray(ramp), (x, y))
    draw.rectangle((x, y, x + width - 1, y + BAR_H - 1), outline=(0, 0, 0))
    left, right = _label(lo), _label(hi)
    draw.text((x, y + BAR_H + 1), left, fill=(0, 0, 0))
    lw, rw = int(draw.textlength(left)), int(draw.textlength(right))
    draw.text((x + max(width - rw, lw + 4), y + BAR_H + 1), right, fill=(0, 0, 0))


def _grid(rows: list[list[np.ndarray]], labels: list[str],
          bars: dict[tuple[int, int], tuple[float, float]] | None = None) -> Image.Image:
    """Panels in rows, column ``labels`` on top; ``bars[(row, col)] = (lo, hi)`` puts a colour
    bar with those end values under that panel."""
    bars = bars or {}
    h, w = rows[0][0].shape[:2]
    scale = max(1, int(np.ceil(MIN_SIDE / max(1, min(h, w)))))
    ph, pw = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    extra = [BAR_H + BAR_TEXT + 2 if any((r, c) in bars for c in range(ncol)) else 0 for r in range(len(rows))]
    width = ncol * pw + (ncol + 1) * GAP
    height = HEADER + len(rows) * ph + sum(extra) + (len(rows) + 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels[:ncol]):
        draw.text((GAP + c * (pw + GAP) + 2, 1), label, fill=(0, 0, 0))
    top = HEADER + GAP
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            im = Image.fromarray(panel).resize((pw, ph), Image.NEAREST)
            x = GAP + c * (pw + GAP)
            canvas.paste(im, (x, top))
            if (r, c) in bars:
                _colorbar(draw, canvas, x, top + ph + 2, pw, *bars[(r, c)])
        top += ph + extra[r] + GAP
    return canvas


def render_png(card: dict, res) -> bytes:
    """The picture of a result (``service.job.JobResult``) of a model with ``card``."""
    mean, std = res.mean.astype(np.float64), res.std
    obs = res.observation_view
    c, h, w = mean.shape
    is_image = not card.get("pde") and card.get("kind") != "pde" and c in (1, 3)
    labels = ["observation", "mean", "std"]
    if is_image:
        vr = card.get("value_range")
        if isinstance(vr, (list, tuple)) and len(vr) == 2 and all(isinstance(v, (int, float)) for v in vr):
            lo, hi = float(vr[0]), float(vr[1])
        else:
            lo, hi = float(mean.min()), float(mean.max())
        img = (lambda a: gray(a[0] if c == 1 else a, lo, hi))
        row = [img(obs) if obs is not None else _blank(h, w), img(mean)]
        bars = {}
        if std is not None:
            s = np.sqrt(np.square(std.astype(np.float64)).mean(0)) if c == 3 else std[0].astype(np.float64)
            row.append(colormap(s, 0.0, float(s.max())))
            bars[(0, 2)] = (0.0, float(s.max()))
            if c == 3:
                labels[2] = "std (RMS of 3 channels)"
        else:
            row.append(_blank(h, w))
        return _png(_grid([row], labels, bars))
    rows, bars = [], {}
    for k in range(c):
        lo, hi = float(mean[k].min()), float(mean[k].max())
        row = [colormap(obs[k], lo, hi) if obs is not None else _blank(h, w), colormap(mean[k], lo, hi)]
        bars[(k, 1)] = (lo, hi)  # the observation shares the mean's scale
        if std is not None:
            row.append(colormap(std[k], 0.0, float(std[k].max())))
            bars[(k, 2)] = (0.0, float(std[k].max()))
        else:
            row.append(_blank(h, w))
        rows.append(row)
    names = card.get("channels") or []
    if names:
        labels = ["observation", "mean", "std (rows: " + ", ".join(map(str, names))[:40] + ")"]
    return _png(_grid(rows, labels, bars))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
