"""Network calls in bounded chunks of the batch, so that memory does not grow with the batch.

A volume of D slices and K samples is a batch of D x K rows; the network sees at most
``chunk`` of them at a time. Without autograd each chunk's activations are freed before the
next chunk runs. Under autograd (DPS, DiffusionPDE, ``fast``'s Kalman step backpropagate
through the network) each chunk is checkpointed (``torch.utils.checkpoint``): only its input
is kept, and its activations are recomputed, chunk by chunk, when the gradient is taken (one
more forward pass per backprop, for memory bounded by one chunk's activations).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

#: Rows of the batch per network call when the caller states none (the service's
#: ``RECONSERVE_SLICE_CHUNK`` sets its own).
DEFAULT_CHUNK = 16


class ChunkedDenoiser(torch.nn.Module):
    """``inner`` applied to at most ``chunk`` rows at a time; a batch that fits is one call,
    exactly as ``inner`` alone. Every other attribute is ``inner``'s."""

    def __init__(self, inner, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        if int(chunk) < 1:
            raise ValueError("chunk must be >= 1")
        self.inner, self.chunk = inner, int(chunk)
        self.shape, self.sigma_min, self.sigma_max = inner.shape, inner.sigma_min, inner.sigma_max
        self.sigma_data = getattr(inner, "sigma_data", 0.5)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.shape[0] <= self.chunk:
            return self.inner(x, sigma)
        grad = torch.is_grad_enabled() and x.requires_grad
        parts = torch.split(x, self.chunk)
        per_row = isinstance(sigma, torch.Tensor) and sigma.dim() > 0 and sigma.shape[0] == x.shape[0]
        sigmas = torch.split(sigma, self.chunk) if per_row else [sigma] * len(parts)
        return torch.cat([checkpoint(self.inner, p, s, use_reentrant=False) if grad else self.inner(p, s)
                          for p, s in zip(parts, sigmas)])
