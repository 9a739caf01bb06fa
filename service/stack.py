"""Stacks and volumes: one request, ``D`` slices, each observed by a 2-D operator.

An observation with a leading slice axis (``[D, *obs_shape]``, or ``[D, H, W]`` for a
one-channel model whose operator observes ``[C, ...]``) is a volume. Its operator applies per
slice: each array of the operator block is shared by every slice, or, when it has a leading
axis of length ``D`` and is not valid as a shared array, one per slice. The job runs its
slices as ``D`` items of one sampler run (``guidance.driver``: the network in chunks of
``RECONSERVE_SLICE_CHUNK`` rows), optionally coupled along z (``"coupling": {"kind": "tv_z",
"weight": w}``, ``guidance.coupling``); its result is ``[K, D, C, H, W]`` samples
(``guidance.volume.merge_slices``). Admission counts every slice (cost x D).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from guidance.coupling import Coupling
from guidance.params import MethodError
from guidance.solve import SolveItem
from guidance.volume import merge_slices, slice_seed
from operators.checks import OperatorSpecError
from operators.spec import OPERATORS

from .api.methods import method_error
from .api.operators import operator_error
from .errors import ApiError
from .problem import Problem, digest, observation_view, solve_item
from .ranges import check_observation


@dataclass
class Volume:
    """The slices of a volume job: one operator per slice (the same object when shared) and the
    coupling (or None). A volume runs as a batch of its own (``Problem.batch_key``)."""

    operators: list
    coupling: Coupling | None
    per_slice: bool

    @property
    def depth(self) -> int:
        return len(self.operators)


def _obs_ndim(kind: str) -> tuple[int, bool]:
    """``(dimensions of one slice's observation, whether its first axis is the channels)``, read
    from the kind's ``observation_shape`` (``"[C,H,W]"``, ``"[m]"``, ...)."""
    words = [w.strip() for w in OPERATORS[kind].observation_shape.strip("[]").split(",")]
    return len(words), words[0] == "C"


def slice_depth(obs: np.ndarray, kind: str, channels: int, from_image: bool) -> int | None:
    """``D`` if ``obs`` is a stack of slices for operator ``kind`` on a ``channels``-channel model,
    else None: ``[D, *obs_shape]``, or ``[D, H, W]`` (``D > 1``) for one channel (not a colour
    image, which keeps its own message)."""
    n, lead_c = _obs_ndim(kind)
    if obs.ndim == n + 1 and obs.shape[0] >= 1:
        return int(obs.shape[0])
    if lead_c and channels == 1 and obs.ndim == n and obs.shape[0] > 1 and not (from_image and obs.shape[0] in (3, 4)):
        return int(obs.shape[0])
    return None


def _slice_spec(spec, fields: list[str], d: int):
    return spec.model_copy(update={k: getattr(spec, k)[d] for k in fields})


def slice_operators(spec, shape: tuple, depth: int) -> tuple[list, list[dict], bool]:
    """``(operators, their constructor arguments, per_slice)``: one shared operator (the list
    holds it ``depth`` times), or one per slice from the arrays with a leading axis ``depth``
    that are not valid shared (422 ``invalid_operator`` if neither works)."""
    cls = OPERATORS[spec.kind_name()]
    try:
        kwargs = cls.check_spec(spec, shape)
        op = cls(shape, **kwargs)
        return [op] * depth, [kwargs], False
    except OperatorSpecError as shared_error:
        fields = [k for k in type(spec).array_fields()
                  if isinstance(getattr(spec, k), np.ndarray) and getattr(spec, k).ndim >= 1
                  and getattr(spec, k).shape[0] == depth]
        if not fields:
            raise operator_error(shared_error) from None
        try:
            args = [cls.check_spec(_slice_spec(spec, fields, d), shape) for d in range(depth)]
        except OperatorSpecError as e:
            raise operator_error(e) from None
    return [cls(shape, **a) for a in args], args, True


def _shape(s) -> str:
    return "[" + ",".join(str(int(v)) for v in s) + "]"


def fit_slices(obs: np.ndarray, operators: list, model_id: str) -> np.ndarray:
    """``obs`` as ``[D, *obs_shape]`` (``[D, H, W]`` gains its channel axis), or 422."""
    obs_shape = tuple(int(s) for s in operators[0].obs_shape)
    if obs.ndim == len(obs_shape) and obs_shape[0] == 1:
        obs = obs[:, None]
    if tuple(obs.shape[1:]) != obs_shape:
        raise ApiError(422, "shape_mismatch",
                       f"observation has shape {_shape(obs.shape)}, a stack of {obs.shape[0]} slices, but operator "
                       f"{operators[0].kind} on model {model_id} observes {_shape(obs_shape)} per slice; send "
                       f"{_shape((obs.shape[0],) + obs_shape)} (slices first)")
    return obs


def coupling_of(body: dict) -> Coupling | None:
    c = body.get("coupling")
    if c is None:
        return None
    c = c if isinstance(c, dict) else c.model_dump()
    return Coupling(kind=c["kind"], weight=float(c["weight"]))


def check_cost(adm, depth: int, settings) -> float:
    """The volume's admission cost (every slice counts): 413/422 as ``prepare.admit`` words them."""
    cost = adm.cost * depth
    if adm.num_samples * depth * math.prod(adm.shape) > settings.max_array_elements * 4:
        raise ApiError(413, "too_large", f"num_samples x slices x model size = "
                       f"{adm.num_samples * depth * math.prod(adm.shape)} values is over the limit; send fewer "
                       "samples or slices")
    if cost > settings.max_job_cost:
        fit = int(settings.max_job_cost // adm.cost)
        raise ApiError(422, "too_costly", f"the job would cost {cost:.3g} pixel-evaluations ({depth} slices x "
                       f"{adm.cost:.3g} each), over the limit of {settings.max_job_cost:.3g}; send at most {fit} "
                       f"slices per job at {adm.num_samples} samples, fewer samples or steps, or split the volume "
                       "into several jobs")
    return cost


def _check_method(adm, operators: list, per_slice: bool, pde) -> None:
    try:
        adm.plan.config.check(operators[0], pde)
        if per_slice and adm.plan.config.exclusive(operators[0]):
            raise MethodError(None, f"{adm.plan.name} works in one operator's SVD basis; it takes operator "
                              "arrays shared by every slice, not one per slice", "fast or dps")
    except MethodError as e:
        sent = adm.body.get("method") if isinstance(adm.body.get("method"), dict) else {}
        raise method_error(e, sent, adm.model.card["id"], adm.plan.name) from None


def build_volume(adm, settings, spec, obs: np.ndarray, arrays: dict, pde_parts: tuple):
    """A volume's ``Problem`` (as ``prepare.build``; the observation goes to ``arrays``); ``spec``:
    the operator block with its arrays decoded (also in ``arrays``); ``pde_parts``: ``prepare._pde``."""
    depth = obs.shape[0]
    cost = check_cost(adm, depth, settings)
    operators, kwargs, per_slice = slice_operators(spec, adm.shape, depth)
    obs = arrays["observation"] = fit_slices(obs, operators, adm.model.card["id"])
    window = getattr(adm, "window", None)  # value_window: data units -> card units (service/labfiles/window.py)
    ys = [op.observed(torch.as_tensor(window.observation(op, obs[d]) if window is not None else obs[d],
                                      dtype=torch.float64)[None])[0] for d, op in enumerate(operators)]
    for op, y in zip(operators, ys):
        check_observation(adm.model.card, op, y, adm.noise_sigma)  # 422 out_of_range
    pde, pde_metric, pde_spec = pde_parts
    _check_method(adm, operators, per_slice, pde)
    volume = Volume(operators, coupling_of(adm.body), per_slice)
    problem = Problem(model=adm.model, operator=operators[0],
                      operator_digest=digest({"kind": operators[0].kind, "slices": kwargs}), y=torch.stack(ys),
                      noise_sigma=adm.noise_sigma, pde=pde, pde_metric=pde_metric, pde_digest=digest(pde_spec),
                      plan=adm.plan, num_samples=adm.num_samples, seed=adm.seed, returns=adm.returns,
                      completion=adm.completion, exclusive=adm.plan.config.exclusive(operators[0]), cost=cost,
                      volume=volume)
    return problem


def refuse_coupling(body: dict) -> None:
    """422: a coupling without slices to couple."""
    if body.get("coupling") is not None:
        raise ApiError(422, "invalid_request", "coupling: couples the slices of a stack; send an observation with "
                       "a leading slice axis ([D, C, H, W], or [D, H, W] for one-channel models), or leave out "
                       "coupling")


# ---------------------------------------------------------------------------- the worker's side
def job_items(p: Problem) -> list[SolveItem]:
    """The items a job runs as: itself, or one per slice of its volume (one volume id, the
    coupling), slice ``d`` drawing from ``guidance.volume.slice_seed(seed, d)``."""
    v = getattr(p, "volume", None)
    if v is None:
        return [solve_item(p)]
    return [SolveItem(op, p.y[d], p.num_samples, slice_seed(p.seed, d), volume=id(p), coupling=v.coupling,
                      pde_metric=p.pde_metric, completion=p.completion) for d, op in enumerate(v.operators)]


def job_outcomes(problems: list[Problem], outs: list) -> list:
    """Each job's ``ItemSolution`` from the batch's (a volume's slices merged, ``[K, D, C, H, W]``)."""
    done, i = [], 0
    for p in problems:
        n = len(job_items(p)) if getattr(p, "volume", None) is not None else 1
        part = outs[i:i + n]
        done.append(merge_slices(part, list(p.y)) if getattr(p, "volume", None) is not None else part[0])
        i += n
    return done


def job_view(p: Problem) -> np.ndarray | None:
    """What ``result.png`` shows as the observation: ``observation_view`` of each slice, ``[D, C, H, W]``."""
    v = getattr(p, "volume", None)
    if v is None:
        return observation_view(p)
    views = [observation_view(replace(p, operator=op, y=p.y[d], volume=None)) for d, op in enumerate(v.operators)]
    return None if any(x is None for x in views) else np.stack(views)


SLICE_RE = re.compile(r"\d{1,9}")


def pick_slice(result, k: Any):
    """``result`` (``service.job.JobResult``) reduced to slice ``k`` (422 for a bad ``k``)."""
    from .job import JobResult  # (job imports problem; no loop at import time)

    if result.samples.ndim != 5:
        raise ApiError(422, "invalid_request", "slice: this result has no slices; leave out slice")
    depth = result.samples.shape[1]
    if not (isinstance(k, int) and 0 <= k < depth):
        raise ApiError(422, "invalid_request", f"slice: must be an integer from 0 to {depth - 1} (the volume has "
                       f"{depth} slices); send e.g. ?slice={depth // 2}")
    view = result.observation_view
    return JobResult(result.samples[:, k], result.metrics, result.nfe, result.elapsed_s, result.batched_with,
                     result.method, None if view is None else view[k])
