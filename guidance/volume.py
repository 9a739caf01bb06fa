"""A volume's slices, solved as items of one batch, put back together as one solution.

A stack of ``D`` slices runs as ``D`` items (``driver.BatchItem`` with one ``volume`` id); each
item is finished on its own (``solve.finish_item``: completion and metrics of that slice).
``merge_slices`` joins them: samples ``[K, D, C, H, W]`` (sample first, as a lone item's
``[K, C, H, W]`` with the slice axis added before the channels) and the metrics of the whole
volume, computed exactly from the slices' own (the relative data residual and the whitened
misfit are sums over the observation's entries, so they combine by weighting).
"""
from __future__ import annotations

import math

import torch

from .solve import ItemSolution, misfit_threshold


def slice_seed(seed: int, d: int) -> int:
    """The seed of slice ``d``'s random stream in a volume drawn from ``seed``: ``seed + d``.

    Each slice has a stream of its own, so the slices' sampling errors are independent and the
    coupling along z averages them out (``bench/volume_ct.py``: +3 dB on 8-angle CT, where one
    stream shared by every slice leaves errors that agree from slice to slice, which no coupling
    removes); and slice ``d`` of an uncoupled volume is exactly a lone run with ``seed + d``.
    """
    return int(seed) + int(d)


def _data_residual(metrics: list[dict], y_norms: list[float]) -> float | None:
    """``||y - A(mean)|| / ||y||`` over the volume: ``sqrt(sum (r_d ||y_d||)^2) / sqrt(sum ||y_d||^2)``."""
    r = [m.get("data_residual") for m in metrics]
    if any(v is None for v in r):
        return None
    den = math.sqrt(sum(n * n for n in y_norms))
    return math.sqrt(sum((v * n) ** 2 for v, n in zip(r, y_norms))) / max(den, 1e-30)


def _misfit(metrics: list[dict]) -> dict:
    """The whitened misfit of each sample over the volume: ``sum_d m_d w_dk / sum_d m_d``
    (every slice shares ``noise_sigma``), and the flag against the volume's threshold."""
    m = [int(x.get("observed_values") or 0) for x in metrics]
    per = [x.get("whitened_misfit") for x in metrics]
    total = sum(m)
    if total == 0 or any(p is None for p in per):
        return {"whitened_misfit": None, "observed_values": total, "misfit_threshold": None, "misfit": None}
    k = len(per[0])
    wm = []
    for j in range(k):
        vals = [p[j] for p in per]
        wm.append(None if any(v is None for v in vals) else sum(md * v for md, v in zip(m, vals)) / total)
    threshold = misfit_threshold(total)
    finite = [v for v in wm if v is not None]
    flag = (sum(finite) / len(finite) > threshold) if len(finite) == len(wm) else True
    return {"whitened_misfit": wm, "observed_values": total, "misfit_threshold": threshold, "misfit": bool(flag)}


def merge_metrics(metrics: list[dict], y_norms: list[float]) -> dict:
    """The volume's metrics from its slices' (``finish``'s keys); ``pde_residual`` the largest
    slice's, ``completed`` whether any slice was completed."""
    pde = [m.get("pde_residual") for m in metrics]
    return {"data_residual": _data_residual(metrics, y_norms),
            "pde_residual": None if any(v is None for v in pde) else max(pde),
            "completed": any(bool(m.get("completed")) for m in metrics),
            **_misfit(metrics)}


def merge_slices(outs: list[ItemSolution], ys: list[torch.Tensor]) -> ItemSolution:
    """One ``ItemSolution`` for a volume from its slices' (in z order) and their observations:
    samples ``[K, D, C, H, W]``; the first slice's error, if one failed to finish."""
    failed = next((o.error for o in outs if o.error is not None), None)
    if failed is not None:
        return ItemSolution(None, {}, failed)
    norms = [float(y.double().norm()) for y in ys]
    return ItemSolution(torch.stack([o.samples for o in outs], 1), merge_metrics([o.metrics for o in outs], norms))
