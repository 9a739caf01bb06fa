"""Safe checkpoints: safetensors weights plus a JSON card beside them; never pickled code.

A checkpoint is a folder ``checkpoints/<id>/`` holding ``card.json`` and ``weights.safetensors``.
The card's ``architecture.name`` says which network to rebuild: ``unet`` (trained here), ``adm``
(guided-diffusion) or ``diffusers`` (``UNet2DModel``), see :mod:`models.formats`, which also
imports outside checkpoints into such folders (``reconserve import``).
The card holds everything needed to use the weights: the architecture and its arguments,
the parameterization and sigma range, the per-channel normalization to physical units
(``x_phys = shift + scale * x_net``), channel names, the PDE and grid for PDE models,
and the recommended methods with their parameters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .denoiser import Denoiser, EDMPrecond, FlowDenoiser
from .grf import GRFDenoiser
from .unet import ARCHITECTURES

CARD, WEIGHTS = "card.json", "weights.safetensors"
REQUIRED_CARD_KEYS = ("id", "kind", "shape", "channels", "architecture", "parameterization", "normalization")


class CheckpointError(ValueError):
    pass


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


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    folder = Path(folder)
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / CARD}: {e}") from e
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"{folder / CARD} misses {missing}")
    from .formats import load_denoiser  # the card's architecture names the format (ours, adm, diffusers)

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
