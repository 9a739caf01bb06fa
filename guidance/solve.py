"""One reconstruction, end to end: physical units in, posterior samples and statistics out.

``solve`` maps the problem into the network's normalized space (``operators.Rescaled``),
picks the method (the model card's first recommended one by default, with the card's
tuned parameters under the caller's), runs it with ``num_samples`` samples as one batch,
and maps back. Used by the CLI and the service alike.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.denoiser import CountingDenoiser
from models.schedules import get_sigmas
from operators.base import Rescaled

from .core import SplitGenerator
from .registry import METHODS


@dataclass
class Plan:
    """A method resolved against a model card: name, frozen config, schedule."""

    name: str
    config: object
    sigmas: torch.Tensor

    def describe(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.config).items()}
        return {"name": self.name, **d}


class PosteriorStats:
    """Mean and per-pixel standard deviation of ``self.samples`` ``[K, C, H, W]``."""

    samples: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(0)

    @property
    def std(self) -> np.ndarray | None:
        return self.samples.std(0, ddof=1) if len(self.samples) > 1 else None


@dataclass
class Solution(PosteriorStats):
    samples: np.ndarray  # [K, C, H, W] physical units, float32
    nfe: int
    elapsed_s: float
    seed: int
    method: dict
    metrics: dict = field(default_factory=dict)


def plan_method(card: dict, denoiser, name: str | None = None, params: dict | None = None) -> Plan:
    """Resolve the method: card default if unnamed; card-tuned parameters under the caller's."""
    recommended = card.get("methods") or [{"name": "fast"}]
    name = name or recommended[0]["name"]
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    tuned = next((dict(m) for m in recommended if m.get("name") == name), {})
    tuned.pop("name", None)
    cfg = METHODS[name].make_config({**tuned, **(params or {})})
    sigmas = get_sigmas(cfg.schedule, cfg.steps, denoiser.sigma_min, denoiser.sigma_max)
    return Plan(name, cfg, sigmas)


def network_problem(model, operator, y: torch.Tensor, pde=None):
    """The operator, observation and PDE term as the sampler sees them (network space)."""
    op = Rescaled(operator, model.shift, model.scale)
    y_net = op.observation(y)
    pde_net = Rescaled(pde, model.shift, model.scale) if pde is not None else None
    return op, y_net, pde_net


def relative_data_residual(operator, y: torch.Tensor, x: torch.Tensor) -> float:
    """``||y - A(x)|| / ||y||`` in physical units."""
    r = (y - operator.forward(x)).norm()
    return float(r / y.norm().clamp_min(1e-30))


def solve(model, operator, y, *, noise_sigma: float = 0.0, pde=None, method: str | None = None,
          params: dict | None = None, num_samples: int = 1, seed: int = 0, callback=None,
          device: str | torch.device = "cpu") -> Solution:
    """Reconstruct from ``y`` (one observation, physical units, no batch dimension)."""
    plan = plan_method(model.card, model.denoiser, method, params)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
    if operator.linear:
        y = operator.observed(y[None])[0]
    op, y_net, pde_net = network_problem(model, operator, y[None], pde)
    den = CountingDenoiser(model.denoiser)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    t0 = time.perf_counter()
    x = METHODS[plan.name].sampler(den, op, y_net.expand((num_samples,) + tuple(y_net.shape[1:])).clone(),
                                   plan.sigmas.to(device), config=plan.config,
                                   generator=SplitGenerator([(gen, num_samples)]), callback=callback,
                                   noise_sigma=float(noise_sigma), pde=pde_net)
    elapsed = time.perf_counter() - t0
    x_phys = op.to_physical(x.detach())
    metrics = {"data_residual": relative_data_residual(operator, y, x_phys.mean(0, keepdim=True)),
               "pde_residual": (float(pde.relative_residual(x_phys.mean(0, keepdim=True))[0])
                                if pde is not None else None)}
    return Solution(x_phys.float().cpu().numpy(), den.nfe, elapsed, int(seed), plan.describe(), metrics)
