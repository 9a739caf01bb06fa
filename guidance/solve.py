"""Reconstruction end to end: physical units in, posterior samples and statistics out.

``solve_batch`` is the one composition of the three stages: it runs a ``Plan`` (a method
resolved against a model: ``plan_method`` with the model card's tuned parameters, ``make_plan``
without) for a batch of problems through the sampler driver (``driver.sample_batch``: network
space, one seeded stream per problem) and finishes each problem's samples (``finish``: physics
completion, then the metrics). ``solve`` is its one-observation case. The CLI, the service's
worker and the benches all solve through ``solve_batch``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from models.schedules import get_sigmas
from operators.base import Operator
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


def make_plan(name: str, params: dict | None, denoiser) -> Plan:
    """Method ``name`` with exactly ``params`` (the method's defaults for the rest), its noise
    schedule on ``denoiser``'s sigma range."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cfg = METHODS[name].make_config(dict(params or {}))
    return Plan(name, cfg, get_sigmas(cfg.schedule, cfg.steps, denoiser.sigma_min, denoiser.sigma_max))


def plan_method(card: dict, denoiser, name: str | None = None, params: dict | None = None) -> Plan:
    """Resolve the method: card default if unnamed; card-tuned parameters under the caller's."""
    recommended = card.get("methods") or [{"name": "fast"}]
    name = name or recommended[0]["name"]
    tuned = next((dict(m) for m in recommended if m.get("name") == name), {})
    tuned.pop("name", None)
    return make_plan(name, {**tuned, **(params or {})}, denoiser)


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


def finish(model, operator, y: torch.Tensor, x_phys: torch.Tensor, pde_metric, completion: str = "auto",
           noise_sigma: float = 0.0):
    """Physics completion (``a`` snapped to the card's ``pde.a_levels``), then the metrics:
    ``data_residual`` and ``pde_residual`` (of ``pde_metric``, None without one) of the mean,
    ``completed``, and the data misfit of every sample (``misfit_metrics``). Shared by ``solve``
    and the service's batched jobs. ``y``: the observation with unobserved entries zeroed."""
    levels = (model.card.get("pde") or {}).get("a_levels")
    x_phys, completed = complete_with_physics(x_phys, operator, pde_metric, completion, levels)
    mean = x_phys.mean(0, keepdim=True)
    return x_phys, {"data_residual": relative_data_residual(operator, y.to(mean), mean),
                    "pde_residual": float(pde_metric.relative_residual(mean)[0]) if pde_metric is not None else None,
                    "completed": completed,
                    **misfit_metrics(operator, y, x_phys, noise_sigma)}


#: The misfit flag's false-alarm level per sample (exact posterior samples, data from the model).
MISFIT_ALPHA = 1e-6
#: The misfit flag's floor: the mean whitened misfit must also exceed this (twice the stated noise
#: energy). Approximate samplers and trained networks move the misfit of data the prior explains
#: away from 1 even where the chi-square band is narrow (large m): 1.0-1.7 measured for ALD on the
#: exact grf-32 prior at noise_sigma >= 0.1, 0.3-1.06 for fast on held-out phantoms (phantom-64).
MISFIT_FLOOR = 2.0


def observed_count(operator, y: torch.Tensor) -> int:
    """``m``: the observation's entries the operator produces (unobserved pixels and unsampled
    k-space, zeroed by ``operator.observed``, do not count); every entry for nonlinear operators."""
    if not getattr(operator, "linear", False):
        return int(y.numel())
    ones = torch.ones((1,) + tuple(y.shape), dtype=y.dtype, device=y.device)
    return int((operator.observed(ones) != 0).sum())


def misfit_threshold(m: int) -> float:
    """``max(MISFIT_FLOOR, chi2.isf(MISFIT_ALPHA, m) / m)``: the mean whitened misfit above which
    the ``misfit`` flag is set (about ``1 + 4.75 sqrt(2/m)`` for large ``m``)."""
    from scipy.stats import chi2

    return max(MISFIT_FLOOR, float(chi2.isf(MISFIT_ALPHA, max(int(m), 1))) / max(int(m), 1))


def misfit_metrics(operator, y: torch.Tensor, x_phys: torch.Tensor, noise_sigma: float) -> dict:
    """The whitened data misfit of each sample, ``||y - A(x_k)||^2 / (m noise_sigma^2)``, and the
    ``misfit`` flag: their mean above ``misfit_threshold(m)``.

    Why it works: if ``y`` was drawn from the model (``x0`` from the prior, ``y = A(x0) + noise``)
    and ``x_k`` is an exact posterior sample, ``(x_k, y)`` has the law of ``(x0, y)``, so
    ``y - A(x_k)`` has the law of the noise and ``||y - A(x_k)||^2 / noise_sigma^2`` is chi-square
    with ``m`` degrees of freedom: the whitened misfit of each sample has mean 1 and standard
    deviation ``sqrt(2/m)``, whatever the prior and the operator. The mean over ``K`` samples
    exceeds a level only if one sample does, so a false alarm has probability at most
    ``K * MISFIT_ALPHA``. A mean far above 1 says that the samples do not explain the data within
    the stated noise: the prior cannot explain the observation, or ``noise_sigma`` is understated,
    or the method has not converged. Without noise (``noise_sigma == 0``) the misfit is undefined:
    every field is None."""
    m = observed_count(operator, y)
    if not noise_sigma > 0 or m == 0:
        return {"whitened_misfit": None, "observed_values": m, "misfit_threshold": None, "misfit": None}
    with torch.no_grad():
        r = (y[None].to(x_phys) - operator.forward(x_phys)).to(torch.float64)
        per_sample = (r.flatten(1).square().sum(1) / (m * float(noise_sigma) ** 2)).cpu().tolist()
    finite = [v for v in per_sample if math.isfinite(v)]
    threshold = misfit_threshold(m)
    flag = (sum(finite) / len(finite) > threshold) if len(finite) == len(per_sample) else True
    return {"whitened_misfit": [v if math.isfinite(v) else None for v in per_sample], "observed_values": m,
            "misfit_threshold": threshold, "misfit": bool(flag)}


def relative_data_residual(operator, y: torch.Tensor, x: torch.Tensor) -> float:
    """``||y - A(x)|| / ||y||`` in physical units."""
    r = (y - operator.forward(x)).norm()
    return float(r / y.norm().clamp_min(1e-30))


@dataclass(frozen=True)
class SolveItem(BatchItem):
    """A ``BatchItem`` and how to finish its samples: the PDE whose residual is reported (and
    whose solver completes ``u``; None: no PDE) and the completion mode."""

    pde_metric: Operator | None = None
    completion: str = "auto"


@dataclass
class ItemSolution:
    """One item's finished samples (``[num_samples, C, H, W]``, state dtype, physical units) and
    metrics (non-finite values as None); ``error`` instead when finishing it failed."""

    samples: torch.Tensor | None
    metrics: dict
    error: Exception | None = None


class BatchSolution(NamedTuple):
    items: list[ItemSolution]
    nfe: int  # network calls (each served every row of the batch)
    seconds: float  # sampler time


def finite_metrics(metrics: dict) -> dict:
    """Non-finite metrics (a diverged sample's residual) as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def finish_item(model, item: SolveItem, x_phys: torch.Tensor, noise_sigma: float) -> ItemSolution:
    """``finish`` for one item; an exception becomes the item's ``error``."""
    try:
        x_phys, metrics = finish(model, item.operator, item.y, x_phys, item.pde_metric, item.completion, noise_sigma)
    except Exception as e:  # noqa: BLE001 - the caller decides (the worker fails that job alone)
        return ItemSolution(None, {}, e)
    return ItemSolution(x_phys, finite_metrics(metrics))


def solve_batch(model, plan: Plan, items: list[SolveItem], *, noise_sigma: float = 0.0, pde=None,
                shared_svd: bool = False, device: str | torch.device = "cpu", callback=None,
                dtype: torch.dtype | str | None = None, finishing: bool = True,
                chunk: int | None = None) -> BatchSolution:
    """Sample ``plan`` for every item in one batch (``driver.sample_batch``: its arguments), then
    finish each item (``finish``). The sampler's errors (``DivergedError``, ...) pass through;
    an item whose finishing fails carries the error. ``finishing=False`` returns the raw
    samples with no metrics (benches that score the samples themselves)."""
    run = sample_batch(model, plan, list(items), noise_sigma=noise_sigma, pde=pde, shared_svd=shared_svd,
                       device=device, callback=callback, dtype=dtype, chunk=chunk)
    if not finishing:
        return BatchSolution([ItemSolution(x, {}) for x in run.samples], run.nfe, run.seconds)
    done = [finish_item(model, it, x, noise_sigma) for it, x in zip(items, run.samples)]
    return BatchSolution(done, run.nfe, run.seconds)


def card_pde(model, pde=None):
    """The PDE whose residual a result reports: the requested one, else the model card's."""
    spec = model.card.get("pde")
    return pde if pde is not None or not spec else build_pde(None, tuple(model.card["shape"]), spec)


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
    item = SolveItem(operator, y, num_samples, seed, pde_metric=card_pde(model, pde), completion=completion)
    run = solve_batch(model, plan, [item], noise_sigma=noise_sigma, pde=pde, device=device, callback=callback)
    out = run.items[0]
    if out.error is not None:
        raise out.error
    return Solution(out.samples.float().cpu().numpy(), run.nfe, run.seconds, int(seed), plan.describe(), out.metrics)
