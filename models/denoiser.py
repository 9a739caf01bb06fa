"""The one denoiser contract: ``D(x, sigma) -> x0_hat`` in sigma-space, ``x = x0 + sigma * n``.

Whatever a network was trained to predict (eps, v, x0, score) and on whichever
process (VP, VE, EDM), a wrapper here turns it into ``D``. Everything downstream
speaks sigma, never integer timesteps (Karras et al. 2022, "Elucidating the
design space", Table 1; k-diffusion's external adapters).
"""
from __future__ import annotations

import torch
from torch import nn

PARAMETERIZATIONS = ("eps", "v", "x0", "score")


def sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (float, 0-d or ``[B]``) as a float64 tensor of shape ``[B]``."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    return s.reshape(x.shape[0])


def _col(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.view((-1,) + (1,) * (x.dim() - 1))


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma) -> x0_hat``. Subclasses set the fields below."""

    shape: tuple[int, int, int]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def net_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float64

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class EDMPrecond(Denoiser):
    """EDM preconditioning (Karras et al. 2022, eq. 7): ``D = c_skip x + c_out F(c_in x, c_noise)``.

    ``net(x_in, c_noise)`` takes ``c_noise = log(sigma) / 4`` of shape ``[B]``.
    """

    def __init__(self, net: nn.Module, shape, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net, self.shape = net, tuple(shape)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def forward(self, x, sigma):
        s = sigma_batch(sigma, x)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s ** 2 + sd2)
        c_in = 1 / torch.sqrt(s ** 2 + sd2)
        c_noise = torch.log(s) / 4
        dt = self.net_dtype()
        f = self.net((_col(c_in, x) * x).to(dt), c_noise.to(dt)).to(x.dtype)
        return _col(c_skip, x).to(x.dtype) * x + _col(c_out, x).to(x.dtype) * f


class VPDenoiser(Denoiser):
    """A discrete-time VP (DDPM) network as a sigma-space denoiser.

    The VP state is ``x_t = sqrt(abar) x0 + sqrt(1 - abar) n = x / sqrt(1 + sigma^2)``, with
    ``sigma = sqrt((1 - abar) / abar)``. The (fractional) timestep is found by interpolating
    ``log sigma`` between the discrete levels. ``out_channels`` keeps the first channels of
    the output (guided-diffusion's learned-variance models output 2C).
    """

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, shape,
                 parameterization: str = "eps", out_channels: int | None = None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}")
        self.net, self.shape, self.parameterization = net, tuple(shape), parameterization
        self.out_channels = out_channels or shape[0]
        sig = torch.sqrt((1 - alphas_cumprod.double()) / alphas_cumprod.double())
        self.register_buffer("log_sigmas", sig.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])
        self.sigma_data = 1.0

    def sigma_to_t(self, s: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose log-sigma interpolates ``log s`` (clamped to the grid)."""
        ls = self.log_sigmas.to(s.device)
        logs = s.log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, logs).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (logs - ls[lo]) / (ls[hi] - ls[lo])
        return lo.double() + w

    def forward(self, x, sigma):
        s = sigma_batch(sigma, x)
        c_in = 1 / torch.sqrt(1 + s ** 2)  # = sqrt(abar)
        x_t = _col(c_in, x) * x
        dt = self.net_dtype()
        out = self.net(x_t.to(dt), self.sigma_to_t(s).to(dt))[:, : self.out_channels].to(x.dtype)
        a, b = _col(c_in, x).to(x.dtype), _col(s * c_in, x).to(x.dtype)  # sqrt(abar), sqrt(1-abar)
        if self.parameterization == "eps":
            return x - _col(s, x).to(x.dtype) * out
        if self.parameterization == "v":  # v = a n - b x0  =>  x0 = a x_t - b v
            return a * x_t.to(x.dtype) - b * out
        if self.parameterization == "x0":
            return out
        # score of x_t: grad log p(x_t) = -n / sqrt(1 - abar)
        return x + _col(s, x).to(x.dtype) * b * out


class VEDenoiser(Denoiser):
    """A continuous VE (NCSN/SMLD) network: ``net(x, c_noise)`` with ``c_noise = sigma`` or ``log sigma``.

    ``score``: ``D = x + sigma^2 s``; ``eps``: ``D = x - sigma eps``; ``x0``: ``D = out``.
    """

    def __init__(self, net: nn.Module, shape, parameterization: str = "score",
                 noise_cond: str = "sigma", sigma_min: float = 0.01, sigma_max: float = 50.0):
        super().__init__()
        if parameterization not in ("score", "eps", "x0"):
            raise ValueError("VE parameterization must be score, eps or x0")
        self.net, self.shape, self.parameterization = net, tuple(shape), parameterization
        self.noise_cond, self.sigma_min, self.sigma_max = noise_cond, sigma_min, sigma_max

    def forward(self, x, sigma):
        s = sigma_batch(sigma, x)
        cond = s.log() if self.noise_cond == "log_sigma" else s
        dt = self.net_dtype()
        out = self.net(x.to(dt), cond.to(dt)).to(x.dtype)
        sc = _col(s, x).to(x.dtype)
        if self.parameterization == "score":
            return x + sc ** 2 * out
        if self.parameterization == "eps":
            return x - sc * out
        return out


class CountingDenoiser(Denoiser):
    """Wraps a denoiser and counts network evaluations (one per batched call)."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner = inner
        self.shape, self.sigma_min = inner.shape, inner.sigma_min
        self.sigma_max, self.sigma_data = inner.sigma_max, inner.sigma_data
        self.nfe = 0

    def forward(self, x, sigma):
        self.nfe += 1
        return self.inner(x, sigma)
