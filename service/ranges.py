"""Observations against the model card's ``value_range``: gross violations are refused (422).

A model's card states the range of the data its prior was trained on (``value_range``: one
``[lo, hi]`` for every channel, ``{channel: [lo, hi]}`` for some channels, or one pair per
channel). Where every observed value is a weighted average of pixels (an operator whose rows
are non-negative and sum to 1: identity, inpainting, sparse points, super-resolution, blur
with a non-negative kernel), a noise-free observation of an in-range image lies in the
range of those pixels' channels, and a noisy one within a few ``noise_sigma`` of it.

The service refuses only *gross* violations: a value outside ``[lo - w - 6 sigma, hi + w +
6 sigma]`` (``w = hi - lo``, the range's width, ``sigma = noise_sigma``). That is an image in
the wrong units (0..255 for a [0, 1] model, percent for a fraction, a field shifted by more
than its whole range) and not an unusual image of the right kind: no image of the right
units gets there, even with noise (6 sigma per value). Smaller departures are left to the
result's misfit flag (``guidance.solve.misfit_metrics``). Operators whose observations are
not pixel averages (compressed sensing, MRI, nonlinear ones) are not checked here.
"""
from __future__ import annotations

import math
import numbers

import torch

from .errors import ApiError

#: Noise margin of the refusal, in noise standard deviations per value.
NOISE_MARGIN = 6.0


def _pair(v) -> tuple[float, float] | None:
    if (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(e, numbers.Real) and not isinstance(e, bool) for e in v)):
        lo, hi = float(v[0]), float(v[1])
        if math.isfinite(lo) and math.isfinite(hi) and hi >= lo:
            return lo, hi
    return None


def channel_ranges(card: dict, channels: int) -> list[tuple[float, float] | None]:
    """The card's ``value_range`` per channel (None: no stated range for that channel)."""
    vr = card.get("value_range")
    names = list(card.get("channels") or [])
    if _pair(vr) is not None:
        return [_pair(vr)] * channels
    if isinstance(vr, dict):
        return [_pair(vr.get(names[k])) if k < len(names) else None for k in range(channels)]
    if isinstance(vr, (list, tuple)) and len(vr) == channels:
        return [_pair(v) for v in vr]
    return [None] * channels


def _averaging(operator, in_shape, observed: torch.Tensor) -> bool:
    """Whether every observed value is a non-negative weighted average of pixels (rows of ``A``
    non-negative, summing to 1), probed with a constant, a random and one impulse per channel."""
    ones = torch.ones((1,) + in_shape, dtype=torch.float64)
    if not torch.allclose(operator.forward(ones)[0][observed], torch.ones((), dtype=torch.float64), atol=1e-6, rtol=0):
        return False
    c, h, w = in_shape
    probes = torch.rand((1 + c,) + in_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probes[1:] = 0
    for k in range(c):
        probes[1 + k, k, h // 2, w // 2] = 1.0
    return bool((operator.forward(probes)[:, observed] >= -1e-9).all())


def check_observation(card: dict, operator, y: torch.Tensor, noise_sigma: float) -> None:
    """Raise ``ApiError(422, "out_of_range")`` when the observation ``y`` (physical units,
    unobserved entries zeroed) is grossly outside the card's value range (module docstring).
    The guard never fails a request for its own sake: an operator it cannot probe is not checked."""
    try:
        _check(card, operator, y, noise_sigma)
    except ApiError:
        raise
    except Exception:  # noqa: BLE001 - e.g. an operator that cannot take the probes
        return


def _check(card: dict, operator, y: torch.Tensor, noise_sigma: float) -> None:
    in_shape = tuple(int(s) for s in operator.in_shape)
    ranges = channel_ranges(card, in_shape[0])
    if all(r is None for r in ranges) or not getattr(operator, "linear", False):
        return
    y = y.detach().to("cpu", torch.float64)
    noise = NOISE_MARGIN * float(noise_sigma)
    if all(r is not None for r in ranges):  # the loosest bounds: most observations stop here
        lo = min(r[0] - (r[1] - r[0]) for r in ranges) - noise
        hi = max(r[1] + (r[1] - r[0]) for r in ranges) + noise
        if y.numel() == 0 or (float(y.min()) >= lo and float(y.max()) <= hi):
            return
    with torch.no_grad():
        observed = operator.observed(torch.ones((1,) + tuple(y.shape), dtype=torch.float64))[0] != 0
        if not bool(observed.any()) or not _averaging(operator, in_shape, observed):
            return
        lo_img = torch.zeros((1,) + in_shape, dtype=torch.float64)
        hi_img, free = lo_img.clone(), lo_img.clone()
        for k, r in enumerate(ranges):
            if r is None:
                free[:, k] = 1.0
            else:
                lo_img[:, k], hi_img[:, k] = r
        lo_y, hi_y = operator.forward(lo_img)[0], operator.forward(hi_img)[0]
        width = hi_y - lo_y
        checked = observed & (operator.forward(free)[0] <= 1e-12)  # values that see no unranged channel
        bad = checked & ((y < lo_y - width - noise) | (y > hi_y + width + noise))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    low, high = float(y[bad].min()), float(y[bad].max())
    names = list(card.get("channels") or [])
    stated = ", ".join(f"{names[k] if k < len(names) else k}: [{r[0]:g}, {r[1]:g}]"
                       for k, r in enumerate(ranges) if r is not None)
    raise ApiError(422, "out_of_range",
                   f"observation: {n_bad} of {int(checked.sum())} observed values lie outside the value range "
                   f"of the model card ({stated}) by more than the width of the range plus {NOISE_MARGIN:g} noise_sigma "
                   f"(offending values {low:.4g} .. {high:.4g}); the prior of model {card.get('id')} was trained on "
                   "data in that range, so the observation is in other units. Send values in the physical "
                   "units of the card: for an image model a PNG/TIFF or a uint8/uint16 .npy (scaled by "
                   "1/255 or 1/65535) or floats rescaled to the range, and noise_sigma in the same units")
