"""``value_window``: the data's units mapped linearly to the card's value range, and back.

With ``value_window = [lo, hi]`` and the card's range ``[vlo, vhi]``, an image in the data's
units is ``x_data = b + s x_card`` with ``s = (hi - lo) / (vhi - vlo)`` and ``b = lo - s vlo``.
For a linear operator the observation follows: ``y_data = A x_data = A(b 1) + s A x_card``, so
``y_card = (y_data - A(b 1)) / s`` (for pixel-averaging operators, ``A(b 1) = b`` on observed
values: the same map as the image's); noise scales by ``1 / s``. A nonlinear operator has no
such map, so a window with one is refused. Results go back by ``x_data = b + s x_card`` and
``std_data = s std_card``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ApiError
from ..ranges import channel_ranges


@dataclass(frozen=True)
class Window:
    """``x_data = offset + scale * x_card`` (identity: no ``value_window``)."""

    scale: float = 1.0
    offset: float = 0.0

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0

    def observation(self, operator, y: np.ndarray) -> np.ndarray:
        """An observation in the data's units -> the card's units."""
        if self.identity:
            return y
        if not getattr(operator, "linear", False):
            raise _refuse(f"operator {operator.kind} is nonlinear, so the observation cannot be mapped to the "
                          "card's units; send it in the card's units without value_window")
        with torch.no_grad():
            shift = operator.forward(torch.full((1,) + tuple(operator.in_shape), self.offset, dtype=torch.float64))[0]
        return (np.asarray(y, dtype=np.float64) - shift.numpy().reshape(np.shape(y))) / self.scale

    def noise(self, sigma: float) -> float:
        return float(sigma) / self.scale

    def values(self, x: np.ndarray) -> np.ndarray:
        """Images (mean, samples) in the card's units -> the data's."""
        return x if self.identity else self.offset + self.scale * np.asarray(x, dtype=np.float64)

    def spread(self, std: np.ndarray) -> np.ndarray:
        """A standard deviation in the card's units -> the data's."""
        return std if self.identity else self.scale * np.asarray(std, dtype=np.float64)


def _refuse(message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"value_window: {message}")


def make_window(value_window, card: dict) -> Window:
    """The request's window for the model ``card`` (identity without one), or 422."""
    if value_window is None:
        return Window()
    lo, hi = (float(v) for v in value_window)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise _refuse(f"[{lo:g}, {hi:g}] is not an interval; send [lo, hi] with lo < hi, in the data's units")
    shape = card.get("shape") or [1]
    ranges = set(channel_ranges(card, int(shape[0])))
    if None in ranges or len(ranges) != 1:
        raise _refuse(f"model {card.get('id')} states no single value range for all its channels to map the "
                      "window to; send the data in the card's units without value_window")
    vlo, vhi = ranges.pop()
    if vhi <= vlo:
        raise _refuse(f"model {card.get('id')} states the empty value range [{vlo:g}, {vhi:g}]; send the data "
                      "in the card's units without value_window")
    scale = (hi - lo) / (vhi - vlo)
    return Window(scale, lo - scale * vlo)
