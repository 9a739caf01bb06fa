"""A servable folder's two files and how they are written: ``card.json`` and ``weights.safetensors``.

The lowest layer of the checkpoint code: :mod:`models.formats` (importing outside models) and
:mod:`models.checkpoint` (loading folders) both build on it, and it imports neither.
The card holds everything needed to use the weights: the architecture and its arguments,
the parameterization and sigma range, the per-channel normalization to physical units
(``x_phys = shift + scale * x_net``), channel names, the PDE and grid for PDE models,
and the recommended methods with their parameters.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .denoiser import Denoiser, EDMPrecond, FlowDenoiser
from .unet import ARCHITECTURES

CARD, WEIGHTS = "card.json", "weights.safetensors"
REQUIRED_CARD_KEYS = ("id", "kind", "shape", "channels", "architecture", "parameterization", "normalization")
#: The method a freshly imported (or trained) card recommends.
DEFAULT_METHODS = [{"name": "fast", "steps": 50}]


class CheckpointError(ValueError):
    pass


def utc_now() -> str:
    """The time a card records (imported, started, updated): UTC, ISO 8601, whole seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def read_card(folder: str | Path) -> dict:
    """``folder/card.json``, checked for the required keys (``CheckpointError`` otherwise)."""
    path = Path(folder) / CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"{path} misses {missing}")
    return card


def build_network(arch: dict) -> torch.nn.Module:
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**arch.get("args", {}))


def wrap_network(net: torch.nn.Module, card: dict) -> Denoiser:
    """Turn a bare network into ``D(x, sigma)`` following the card's parameterization."""
    p = card["parameterization"]
    if p.get("kind") == "flow":
        return FlowDenoiser(net, card["shape"], sigma_min=card.get("sigma_min", 0.002),
                            sigma_max=card.get("sigma_max", 80.0))
    if p.get("kind") != "edm":
        raise CheckpointError(f"unsupported parameterization {p!r} for a native checkpoint (edm or flow)")
    return EDMPrecond(net, card["shape"], sigma_data=p.get("sigma_data", 0.5),
                      sigma_min=card.get("sigma_min", 0.002), sigma_max=card.get("sigma_max", 80.0))


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """``safetensors`` file written atomically, readable as the umask allows (safetensors
    creates it 0600: a server running as another user, e.g. in the image, could not read it)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)


def save_checkpoint(folder: str | Path, net: torch.nn.Module, card: dict) -> Path:
    """Write ``weights.safetensors`` and ``card.json`` into ``folder`` (atomically per file)."""
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"card misses {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_tensors(state, folder / WEIGHTS)
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(folder / CARD)
    return folder
