"""The validated problem a job runs, and the stable digests that identify its parts."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guidance.solve import Plan, SolveItem
from operators.base import Operator


def digest(obj: Any) -> str:
    """A stable hash of nested dicts/lists/numbers/strings/numpy arrays."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            h.update(b"A" + a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes())
        elif isinstance(o, torch.Tensor):
            feed(o.detach().cpu().numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                feed(str(k))
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for e in o:
                feed(e)
            h.update(b"]")
        else:
            h.update(b"S" + json.dumps(o, default=repr).encode() + b";")

    feed(obj)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the validated problem
@dataclass
class Problem:
    """Everything a job needs, validated: the model, its operator, observation and plan."""

    model: Any  # models.checkpoint.LoadedModel
    operator: Operator  # physical units
    operator_digest: str
    y: torch.Tensor  # observation, float64, obs_shape, physical units
    noise_sigma: float
    pde: Operator | None  # the requested PDE term (passed to the sampler)
    pde_metric: Operator | None  # the PDE whose residual is reported (requested or the card's)
    pde_digest: str
    plan: Plan
    num_samples: int
    seed: int
    returns: tuple[str, ...]
    exclusive: bool = False  # only jobs with this very operator share a run (the method's rule)
    completion: str = "auto"
    cost: float = 0.0  # admission cost (prepare.job_cost)
    volume: Any = None  # service.stack.Volume: the slices of a stack (then y is [D, *obs_shape])

    @property
    def nbytes(self) -> int:
        """Memory the queued problem holds in arrays (observation and operator arrays)."""
        return int(self.y.numel() * self.y.element_size()) + sum(
            int(v.numel() * v.element_size()) for v in vars(self.operator).values() if isinstance(v, torch.Tensor))

    @property
    def model_id(self) -> str:
        return self.model.card["id"]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one sampler run."""
        op = self.operator
        return (self.model_id, json.dumps(self.plan.describe(), sort_keys=True, default=repr),
                float(self.noise_sigma), self.pde_digest, op.kind, tuple(op.in_shape), tuple(op.obs_shape),
                bool(op.linear), getattr(op, "row_gram", None), bool(op.channel_separable),
                type(op).__name__,
                self.operator_digest if self.exclusive else None,
                id(self) if self.volume is not None else None)  # a volume runs alone


def solve_item(p: Problem) -> SolveItem:
    """The problem as ``guidance.solve.solve_batch`` takes it (samples, seed, how to finish)."""
    return SolveItem(p.operator, p.y, p.num_samples, p.seed, pde_metric=p.pde_metric, completion=p.completion)


def observation_view(p: Problem) -> np.ndarray | None:
    """The observation in image space (what ``result.png`` shows beside the mean): itself, or
    ``A^+ y`` for linear operators; None otherwise."""
    op, y = p.operator, p.y
    if op is None:
        return None
    if tuple(y.shape) == tuple(op.in_shape):
        return y.numpy()
    if getattr(op, "linear", False):
        try:
            with torch.no_grad():
                return op.pseudo_inverse(y[None].to(torch.float64))[0].numpy()
        except Exception:  # noqa: BLE001 - a picture without the observation is still a picture
            return None
    return None
