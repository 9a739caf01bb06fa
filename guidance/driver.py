"""The one sampler driver: physical problems in, physical posterior samples out.

``sample_batch`` maps each problem into the network's normalized space (``network_problem``),
stacks the observations along the batch (each problem's operator on its own rows, through
``operators.BatchedOperator``), gives each problem its own seeded random stream
(``SplitGenerator``), runs the method once with a counting denoiser and maps the samples
back. A problem gets the samples it would get alone: bit for bit for float64 models, to
float32 rounding of the network at another batch size otherwise. ``guidance.solve.solve``,
the service's worker and the benches all sample through it.

On a device other than the CPU the state is float32 (``core.state_dtype``; ``dtype`` overrides)
and each problem's generator lives on that device, so a seed's samples differ between the CPU
and CUDA (each is reproducible on its own, batched or alone).

Volumes: items that are slices of one volume (``BatchItem.volume``, consecutive, in z order)
with a ``coupling`` have the network's estimates of their slices coupled (``coupling.py``:
``CoupledDenoiser`` around the network, so every method gets it where it calls the network),
and ``chunk`` bounds the rows per network call (``chunked.py``) whatever the batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from models.denoiser import CountingDenoiser
from operators.base import Operator, Rescaled
from operators.batched import BatchedOperator

from .chunked import ChunkedDenoiser
from .coupling import CoupledDenoiser, Coupling, VolumeCoupler
from .core import Callback, DivergedError, SplitGenerator, make_generator, state_dtype
from .registry import METHODS


@dataclass(frozen=True)
class BatchItem:
    """One problem of a batch: its operator and observation (physical units, no batch
    dimension) and how many posterior samples to draw from which seed. Slices of a volume
    share a ``volume`` id (any hashable; consecutive items, in z order) and its ``coupling``."""

    operator: Operator
    y: torch.Tensor
    num_samples: int = 1
    seed: int = 0
    volume: object = None
    coupling: Coupling | None = None


class BatchRun(NamedTuple):
    samples: list[torch.Tensor]  # per item, [num_samples, C, H, W] in the state dtype, physical units
    nfe: int  # network calls (each served every row of the batch)
    seconds: float  # sampler time


def network_problem(model, operator, y: torch.Tensor, pde=None):
    """The operator, observation and PDE term as the sampler sees them (network space)."""
    op = Rescaled(operator, model.shift, model.scale)
    y_net = op.observation(y)
    pde_net = Rescaled(pde, model.shift, model.scale) if pde is not None else None
    return op, y_net, pde_net


def volume_coupler(items: list[BatchItem], scale: torch.Tensor) -> VolumeCoupler | None:
    """The coupling of the batch's volumes (None without one): each run of consecutive items
    with one ``volume`` id and a coupling of positive weight, its rows ``[K, D]`` (item ``d``'s
    sample ``k``), its weight in network units (``w / scale`` per channel: ``x = shift + scale
    x_net``, so TV of the physical volume is ``scale`` times the network's)."""
    volumes, iters, start, offsets = [], 0, 0, [0]
    for it in items:
        offsets.append(offsets[-1] + it.num_samples)
    while start < len(items):
        end = start + 1
        while end < len(items) and items[start].volume is not None and items[end].volume == items[start].volume:
            end += 1
        c = items[start].coupling
        if end - start > 1 and c is not None and c.weight > 0:
            k = items[start].num_samples
            rows = torch.stack([torch.arange(offsets[d], offsets[d] + k) for d in range(start, end)], 1)
            weight = (c.weight / torch.as_tensor(scale, dtype=torch.float64)).reshape(-1, 1, 1)
            volumes.append((rows, weight))
            iters = max(iters, c.iters)
        start = end
    return VolumeCoupler(volumes, iters) if volumes else None


def sample_batch(model, plan, items: list[BatchItem], *, noise_sigma: float = 0.0, pde=None,
                 shared_svd: bool = False, device: str | torch.device = "cpu",
                 callback: Callback = None, dtype: torch.dtype | str | None = None,
                 chunk: int | None = None) -> BatchRun:
    """Run ``plan`` (a ``guidance.solve.Plan``) once for every item of a batch.

    The items share the model, the plan, ``noise_sigma`` and the PDE term ``pde`` (physical
    units, or None). Items holding one operator object use it over the whole batch; otherwise
    each operator acts on its own rows, and ``shared_svd`` says that they are all identical so
    one SVD serves the batch (projection ALD needs it; without it a batch of different SVDs
    raises ``operators.Unbatchable``). A ``DivergedError`` of the sampler passes through with
    the network calls made until then as its ``nfe``. The state (and the samples) are in
    ``state_dtype(device, dtype)``: float64 on the CPU, float32 on CUDA unless ``dtype`` says.
    ``chunk``: at most this many rows per network call (None: the whole batch in one call).
    """
    dt = state_dtype(device, dtype)
    nets = [network_problem(model, it.operator, it.y.to(device=device, dtype=dt)[None], pde)
            for it in items]
    counts = [it.num_samples for it in items]
    ops = [op for op, _, _ in nets]
    operator = ops[0] if all(it.operator is items[0].operator for it in items) else BatchedOperator(
        ops, counts, shared_svd=shared_svd)
    y_all = torch.cat([y.expand((k,) + tuple(y.shape[1:])) for (_, y, _), k in zip(nets, counts)])
    pde_net = nets[0][2]
    net = ChunkedDenoiser(model.denoiser, chunk) if chunk else model.denoiser
    coupler = volume_coupler(items, model.scale)
    den = CountingDenoiser(CoupledDenoiser(net, coupler) if coupler is not None else net)
    gen = SplitGenerator([(make_generator(it.seed, device), it.num_samples) for it in items])
    t0 = time.perf_counter()
    try:
        x = METHODS[plan.name].sampler(den, operator, y_all, plan.sigmas, config=plan.config,
                                       generator=gen, callback=callback, noise_sigma=float(noise_sigma),
                                       pde=pde_net)
    except DivergedError as e:
        e.nfe = den.nfe  # the calls made before it diverged
        raise
    seconds = time.perf_counter() - t0
    x_phys = ops[0].to_physical(x.detach())  # one model: one shift and scale for every item
    return BatchRun(list(torch.split(x_phys, counts)), den.nfe, seconds)
