"""One reconstruction, end to end: physical units in, posterior samples and statistics out.

``solve`` maps the problem into the network's normalized space (``operators.Rescaled``),
picks the method (the model card's first recommended one by default, with the card's
tuned parameters under the caller's), runs it with ``num_samples`` samples as one batch
(``driver.sample_batch``), and maps back. Used by the CLI and the service alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from models.schedules import get_sigmas
from operators.spec import build_pde

from .driver import BatchItem, sample_batch
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


COMPLETION_MODES = ("auto", "solve", "off")


def observes_channel(operator, channel: int) -> bool:
    """Whether the observation depends on input ``channel`` (nonlinear operators: assumed so)."""
    if not operator.linear:
        return True
    e = torch.zeros((1,) + tuple(operator.in_shape), dtype=torch.float64)
    e[:, channel] = torch.randn(e.shape[2:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return bool(operator.forward(e).abs().amax() > 0)


def complete_with_physics(x_phys: torch.Tensor, operator, pde, mode: str = "auto", levels=None):
    """Physics completion of PDE samples: ``u`` replaced by the exact solution for each sample's
    ``a`` (snapped to ``levels``, the card's ``pde.a_levels``, when given).

    ``u`` is a function of ``a``, so this turns a posterior sample of ``a`` into the matching
    posterior sample of ``(a, u)``, with zero PDE residual and no network call. ``auto`` does it
    when the observation says nothing of ``u`` (the forward problem); ``solve`` always (it gives
    up agreement with observed ``u``); ``off`` never. Returns ``(x, done)``.
    """
    if mode not in COMPLETION_MODES:
        raise ValueError(f"completion: {mode!r} is not one of {list(COMPLETION_MODES)}")
    if pde is None or mode == "off":
        return x_phys, False
    if mode == "auto" and observes_channel(operator, pde.channels[1]):
        return x_phys, False
    return pde.complete(x_phys, levels), True


def finish(model, operator, y: torch.Tensor, x_phys: torch.Tensor, pde_metric, completion: str = "auto"):
    """Physics completion (``a`` snapped to the card's ``pde.a_levels``), then the metrics of the
    mean: ``data_residual``, ``pde_residual`` (of ``pde_metric``, None without one), ``completed``.
    Shared by ``solve`` and the service's batched jobs."""
    levels = (model.card.get("pde") or {}).get("a_levels")
    x_phys, completed = complete_with_physics(x_phys, operator, pde_metric, completion, levels)
    mean = x_phys.mean(0, keepdim=True)
    return x_phys, {"data_residual": relative_data_residual(operator, y.to(mean), mean),
                    "pde_residual": float(pde_metric.relative_residual(mean)[0]) if pde_metric is not None else None,
                    "completed": completed}


def relative_data_residual(operator, y: torch.Tensor, x: torch.Tensor) -> float:
    """``||y - A(x)|| / ||y||`` in physical units."""
    r = (y - operator.forward(x)).norm()
    return float(r / y.norm().clamp_min(1e-30))


def solve(model, operator, y, *, noise_sigma: float = 0.0, pde=None, method: str | None = None,
          params: dict | None = None, num_samples: int = 1, seed: int = 0, callback=None,
          device: str | torch.device = "cpu", completion: str = "auto") -> Solution:
    """Reconstruct from ``y`` (one observation, physical units, no batch dimension).

    ``completion`` (PDE models): see ``complete_with_physics``; it uses the requested PDE, or
    the model card's when ``pde`` is None."""
    plan = plan_method(model.card, model.denoiser, method, params)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
    if operator.linear:
        y = operator.observed(y[None])[0]
    run = sample_batch(model, plan, [BatchItem(operator, y, num_samples, seed)], noise_sigma=noise_sigma,
                       pde=pde, device=device, callback=callback)
    card_pde = model.card.get("pde")
    pde_metric = pde if pde is not None or not card_pde else build_pde(None, tuple(model.card["shape"]), card_pde)
    x_phys, metrics = finish(model, operator, y, run.samples[0], pde_metric, completion)
    return Solution(x_phys.float().cpu().numpy(), run.nfe, run.seconds, int(seed), plan.describe(), metrics)
