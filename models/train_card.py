"""The card of a model trained here: its channels, PDE, value range, normalization and training record.

Normalization: per channel, network space ``x_net = (x_phys - shift) / scale`` has mean 0 and
standard deviation 0.5 (Darcy ``a`` in {3, 12}: ``shift = 7.5, scale = 9`` so ``a -> +-0.5``);
the card records ``normalization: {shift, scale}`` with ``x_phys = shift + scale * x_net``.
"""
from __future__ import annotations

import numpy as np

from . import data as D
from .card import DEFAULT_METHODS
from .trainer import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, arch_args


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def data_kind(cfg: dict, meta: dict | None) -> str:
    """``darcy``/``poisson``/``helmholtz``/``phantom`` for built-in (or shard-written) data, else ``folder``."""
    if cfg["data"] in D.KINDS:
        return cfg["data"]
    if meta and meta.get("kind") in D.KINDS:
        return meta["kind"]
    return "folder"


def normalization(data: np.ndarray, kind: str) -> tuple[list[float], list[float]]:
    """Per-channel ``shift, scale`` (``x_phys = shift + scale * x_net``) with mean 0 and std 0.5 in network space.

    Darcy's ``a`` in {3, 12} gets ``shift = 7.5, scale = 9`` (``a -> +-0.5``); other channels
    their data-set mean and twice their standard deviation (rounded to 6 digits).
    """
    x = data.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    shift = [_round(m) for m in mean]
    scale = [_round(2 * s) if s > 0 else 1.0 for s in std]
    if kind == "darcy":
        shift[0], scale[0] = (D.DARCY_LOW + D.DARCY_HIGH) / 2, D.DARCY_HIGH - D.DARCY_LOW
    return shift, scale


def parameterization(objective: str) -> dict:
    """The card's ``parameterization`` of a native checkpoint."""
    if objective == "flow":
        return {"kind": "flow", "interpolant": "x_t = (1 - t) x0 + t z, z ~ N(0, I)", "target": "v = z - x0",
                "sigma": "t / (1 - t)", "x": "x_t / (1 - t)", "c_noise": "log(sigma) / 4"}
    return {"kind": "edm", "sigma_data": SIGMA_DATA}


LOSS_TEXT = {"edm": "EDM (P_mean=-1.2, P_std=1.2, sigma_data=0.5)",
             "flow": "flow matching, v = z - x0, unweighted; logit t ~ N(-1.2, 1.2)"}


def build_card(cfg: dict, kind: str, shape, shift, scale, meta: dict | None, train_info: dict,
               existing: dict | None, folder: dict | None = None) -> dict:
    """The card of a trained model. ``folder`` (user data): ``{"images": bool, "min": float, "max": float}``.

    Image folders (PNG/TIFF) get ``value_range [0, 1]`` (integer images are scaled into it; float
    TIFFs outside it get their data range) and channels ``gray`` or ``r, g, b``; ``.npy`` folders
    their data range. Every new card recommends :data:`models.formats.DEFAULT_METHODS`.
    """
    n = shape[-1]
    grid = {"n": n, "h": 1.0 / (n - 1), "domain": [0, 1]}
    bc = "u=0 on boundary nodes"
    channels = (meta or {}).get("channels")
    pde, value_range = None, None
    if kind == "darcy":
        channels = ["a", "u"]
        pde = {"kind": "darcy", "f": 1.0, "grid": grid, "bc": bc,
               "equation": "-div(a grad u) = f, 5-point finite-volume stencil, arithmetic face averages",
               "a_levels": [D.DARCY_LOW, D.DARCY_HIGH]}
        value_range = {"a": [D.DARCY_LOW, D.DARCY_HIGH]}
        desc = (f"Darcy flow prior on a {n}x{n} node grid: permeability a in {{3, 12}} (thresholded GRF, "
                "alpha=2, tau=3) and pressure u solving -div(a grad u) = 1 with u = 0 on the boundary.")
    elif kind in ("poisson", "helmholtz"):
        channels = ["a", "u"]
        pde = {"kind": kind, "grid": grid, "bc": bc,
               "equation": "laplace(u) = a" if kind == "poisson" else "laplace(u) + k^2 u = a",
               "a_scale": (meta or {}).get("a_scale")}
        if kind == "helmholtz":
            pde["k"] = 1.0
        desc = (f"{kind.capitalize()} prior on a {n}x{n} node grid: source a (GRF alpha=2, tau=3, unit std over "
                f"the training set) and solution u of {pde['equation']} with u = 0 on the boundary.")
    elif kind == "phantom":
        channels = ["intensity"]
        value_range = [0.0, 1.0]
        desc = f"Random Shepp-Logan-like phantoms, {n}x{n}, intensities in [0, 1]."
    else:
        f = folder or {}
        lo, hi = f.get("min"), f.get("max")
        if f.get("images"):
            value_range = [0.0, 1.0] if lo is None or (lo >= 0.0 and hi <= 1.0) else [_round(lo), _round(hi)]
            if not channels and shape[0] in (1, 3):
                channels = ["gray"] if shape[0] == 1 else ["r", "g", "b"]
        elif lo is not None:
            value_range = [_round(lo), _round(hi)]
        how = (f"brought to {shape[-2]}x{shape[-1]} ({D.RESIZE_RULE})" if cfg.get("resize")
               else f"at their native size {shape[-2]}x{shape[-1]}")
        desc = (f"Prior trained on the {'images' if f.get('images') else 'arrays'} in {cfg['data']}, {how}; "
                f"values in {value_range}.")
    if not channels or len(channels) != shape[0]:
        channels = ["intensity"] if shape[0] == 1 else [f"c{i}" for i in range(shape[0])]
    if cfg.get("objective", "edm") == "flow":
        desc += (" A flow-matching network (velocity of x_t = (1 - t) x0 + t z) served as the denoiser "
                 "D(x, sigma) through x0 = x_t - t v, sigma = t / (1 - t).")
    card = {
        "id": cfg["id"],
        "kind": "pde" if pde else "image",
        "shape": list(shape),
        "channels": channels,
        "architecture": {"name": "unet", "args": arch_args(cfg, shape[0])},
        "parameterization": parameterization(cfg.get("objective", "edm")),
        "sigma_min": SIGMA_MIN,
        "sigma_max": SIGMA_MAX,
        "normalization": {"shift": list(shift), "scale": list(scale),
                          "meaning": "x_phys = shift + scale * x_net (per channel)"},
        "pde": pde,
        "value_range": value_range,
        "description": cfg.get("description") or desc,
        "training": train_info,
        "methods": [dict(m) for m in DEFAULT_METHODS],
    }
    if existing:  # keep what others added (recommended methods, validation, ...)
        for k, v in existing.items():
            if k == "methods" and not v:  # an empty list (older cards): the default stays
                continue
            if k not in card or k in ("methods", "validation"):
                card[k] = v
        if cfg.get("description") is None and existing.get("description"):
            card["description"] = existing["description"]
    return card
