"""The one denoiser contract: ``D(x, sigma) -> x0_hat`` in sigma-space, ``x = x0 + sigma * n``.

Whatever a network was trained to predict (eps, v, x0, score) and on whichever
process (VP, VE, EDM), a wrapper here turns it into ``D``. Everything downstream
speaks sigma, never integer timesteps (Karras et al. 2022, "Elucidating the
design space", Table 1; k-diffusion's external adapters).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

PARAMETERIZATIONS = ("eps", "v", "x0", "score")
#: ``NetworkOptions.autocast`` names.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (float, 0-d or ``[B]``) as a float64 tensor of shape ``[B]``."""
    if isinstance(sigma, (int, float)):
        # filled on the device: ``as_tensor(float, device=cuda)`` copies from the host and waits
        return torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    return s.reshape(x.shape[0])


def _col(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.view((-1,) + (1,) * (x.dim() - 1))


@dataclass(frozen=True)
class NetworkOptions:
    """How a denoiser's network runs (``configure_network``); all off by default.

    ``autocast``: "bf16" or "fp16" runs the network under ``torch.autocast`` on CUDA (the
    preconditioning and the sampler state keep their dtype; ignored on the CPU).
    ``channels_last``: weights and inputs in NHWC memory order (convolutions on tensor cores).
    ``compile``: ``torch.compile`` the network (a mode name such as "max-autotune", or True
    for the default); the first calls at each new batch size compile.
    """

    autocast: str | None = None
    channels_last: bool = False
    compile: bool | str = False

    def __post_init__(self):
        if self.autocast not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, not {self.autocast!r}")


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma) -> x0_hat``. Subclasses set the fields below.

    Subclasses wrapping a network call it through ``call_net`` (so ``NetworkOptions`` apply)."""

    shape: tuple[int, int, int]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    options: NetworkOptions = NetworkOptions()

    def net_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float64

    def call_net(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``self.net(x, cond)`` in the network's dtype, under the configured options; the
        output is in the network's (or autocast's) dtype: callers cast it back."""
        dt = self.net_dtype()
        x, cond = x.to(dt), cond.to(dt)
        o = self.options
        net = self.__dict__.get("_compiled_net")
        net = self.net if net is None else net
        if o.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ac = AUTOCAST_DTYPES.get(o.autocast) if x.device.type == "cuda" else None
        with torch.autocast("cuda", dtype=ac) if ac is not None else contextlib.nullcontext():
            out = net(x, cond)
        return out.contiguous() if o.channels_last else out

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
        f = self.call_net(_col(c_in, x) * x, c_noise).to(x.dtype)
        return _col(c_skip, x).to(x.dtype) * x + _col(c_out, x).to(x.dtype) * f


class FlowDenoiser(Denoiser):
    """A flow-matching (rectified-flow / linear stochastic-interpolant) velocity network as ``D``.

    Trained on ``x_t = (1 - t) x0 + t z`` (``z ~ N(0, I)``) to predict ``v = z - x0``. The same
    point in sigma-space: ``x_t / (1 - t) = x0 + t / (1 - t) z``, so ``sigma = t / (1 - t)``,
    ``x = x_t / (1 - t)``; then ``x0 = x_t - t v``. ``net(x_t, c_noise)`` takes
    ``c_noise = log(sigma) / 4`` (= logit(t) / 4, EDM's conditioning) of shape ``[B]``.
    """

    def __init__(self, net: nn.Module, shape, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net, self.shape = net, tuple(shape)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @staticmethod
    def t_of(sigma: torch.Tensor) -> torch.Tensor:
        return sigma / (1 + sigma)

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.call_net(x_t, torch.log(sigma) / 4).to(x_t.dtype)

    def forward(self, x, sigma):
        s = sigma_batch(sigma, x)
        t = _col(self.t_of(s), x).to(x.dtype)
        x_t = x * (1 - t)
        return x_t - t * self.velocity(x_t, s)


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
        out = self.call_net(x_t, self.sigma_to_t(s))[:, : self.out_channels].to(x.dtype)
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
        out = self.call_net(x, cond).to(x.dtype)
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


def configure_network(denoiser: Denoiser, options: NetworkOptions | None = None, **kw) -> Denoiser:
    """Apply ``NetworkOptions`` (or keyword arguments naming its fields) to ``denoiser`` in place
    and return it; a ``CountingDenoiser`` passes them to the one it wraps. Idempotent:
    ``channels_last`` converts the weights once, ``compile`` compiles once (and only when the
    denoiser has a ``net``). Analytic denoisers (no ``net``) are returned unchanged."""
    options = options or NetworkOptions(**kw)
    inner = denoiser.inner if isinstance(denoiser, CountingDenoiser) else denoiser
    net = getattr(inner, "net", None)
    if not isinstance(net, nn.Module):
        return denoiser
    if options.channels_last:
        net.to(memory_format=torch.channels_last)
    elif inner.options.channels_last:
        net.to(memory_format=torch.contiguous_format)
    if options.compile and "_compiled_net" not in inner.__dict__:
        mode = options.compile if isinstance(options.compile, str) else None
        # kept out of the module tree (no state_dict keys, no second registration)
        object.__setattr__(inner, "_compiled_net", torch.compile(net, mode=mode))
    elif not options.compile:
        inner.__dict__.pop("_compiled_net", None)
    inner.options = options
    return denoiser
