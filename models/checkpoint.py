"""Safe checkpoints: safetensors weights plus a JSON card beside them; never pickled code.

A checkpoint is a folder ``checkpoints/<id>/`` holding ``card.json`` and ``weights.safetensors``
(written by :mod:`models.card`, whose names are re-exported here). The card's ``architecture.name``
says which network to rebuild: ``unet`` (trained here), ``adm`` (guided-diffusion) or ``diffusers``
(``UNet2DModel``), see :mod:`models.formats`, which also imports outside checkpoints into such
folders (``reconserve import``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .card import (CARD, REQUIRED_CARD_KEYS, WEIGHTS, CheckpointError, build_network, read_card,  # noqa: F401
                   save_checkpoint, save_tensors, wrap_network)
from .denoiser import Denoiser
from .formats import load_denoiser
from .grf import GRFDenoiser


@dataclass
class LoadedModel:
    """A model ready to sample: its card, its denoiser (network space) and its normalization."""

    card: dict
    denoiser: Denoiser

    @property
    def id(self) -> str:
        return self.card["id"]

    @property
    def shift(self) -> torch.Tensor:
        return torch.tensor(self.card["normalization"]["shift"], dtype=torch.float64)

    @property
    def scale(self) -> torch.Tensor:
        return torch.tensor(self.card["normalization"]["scale"], dtype=torch.float64)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The folder's card and denoiser (its format named by the card's architecture), frozen on ``device``."""
    folder = Path(folder)
    card = read_card(folder)
    den = load_denoiser(folder, card).to(device).eval()
    for p in den.parameters():
        p.requires_grad_(False)
    return LoadedModel(card, den)


def builtin_models() -> dict[str, LoadedModel]:
    """Models that need no weights: the analytic ``grf-32``."""
    g = GRFDenoiser(32)
    return {"grf-32": LoadedModel(g.card(), g)}


def default_checkpoint_dir() -> Path:
    """The embedded priors: ``models/checkpoints/`` where a wheel install ships them as package
    data (``setup.py`` copies them there), else ``checkpoints/`` of the checkout this runs from."""
    shipped = Path(resources.files(__package__)) / "checkpoints"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parent.parent / "checkpoints"


def load_models(*folders: str | Path, device: str | torch.device = "cpu",
                skipped: dict[str, str] | None = None) -> dict[str, LoadedModel]:
    """The built-in models plus every checkpoint folder (a folder with ``card.json``) under
    ``folders``. With ``skipped`` (a dict), a folder that fails to load is left out and its
    error recorded there (folder -> message) instead of failing the whole call."""
    models = builtin_models()
    for root in folders or (default_checkpoint_dir(),):
        root = Path(root)
        if not root.is_dir():
            continue
        for card in sorted(root.glob(f"*/{CARD}")):
            if (card.parent / WEIGHTS).exists():
                try:
                    m = load_checkpoint(card.parent, device)
                except Exception as e:
                    if skipped is None:
                        raise
                    skipped[str(card.parent)] = _load_error(card.parent, e)
                    continue
                models[m.id] = m
    return models


def _load_error(folder: Path, e: Exception) -> str:
    """What went wrong, naming the file where the library's message does not (safetensors
    reports an unreadable file as "No such file or directory")."""
    unreadable = [p.name for p in (folder / CARD, folder / WEIGHTS) if p.exists() and not os.access(p, os.R_OK)]
    if unreadable:
        return f"{', '.join(unreadable)} not readable by this user (check the file permissions)"
    return f"{type(e).__name__}: {e}"
