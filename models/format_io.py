"""What importing an outside model reads and writes: settings files, plain state dicts (pickles with
code refused, with a hint on converting them), VP schedules, and the card of an imported image model.

Used by the formats of :mod:`models.formats`; builds on :mod:`models.card` only.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from .card import CARD, DEFAULT_METHODS, CheckpointError

_PICKLE_SUFFIXES = (".pkl", ".pickle")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

CONVERT_HINT = (
    "reconserve never unpickles code. Convert it where the authors' code is installed: load the "
    "network there and save its weights only, e.g.\n"
    "    torch.save(net.state_dict(), 'weights.pt')        # or\n"
    "    safetensors.torch.save_file(net.state_dict(), 'weights.safetensors')\n"
    "(for an EDM .pkl: net = pickle.load(open(path, 'rb'))['ema']), then import that file. "
    "reconserve imports guided-diffusion/ADM UNet state dicts (`reconserve import adm FILE --config "
    "model_config.yaml`) and diffusers UNet2DModel folders (`reconserve import diffusers FOLDER`); "
    "an EDM network (SongUNet/DhariwalUNet) has no importer yet.")


class PickledCheckpointError(CheckpointError):
    """A checkpoint that holds pickled code, or is not a plain state dict."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(paths) -> dict:
    """Merge one or more YAML (``.yaml``/``.yml``) or JSON files into one dict (later files win).

    DPS keeps its settings in ``configs/model_config.yaml`` and ``diffusion_config.yaml``: pass both.
    """
    if paths is None:
        return {}
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: dict = {}
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text()
        except OSError as e:
            raise CheckpointError(f"cannot read the config {p}: {e}") from None
        if p.suffix.lower() in (".yaml", ".yml"):
            data = _read_yaml(text, p)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: not valid JSON ({e}); YAML files must end in .yaml or .yml") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
        out.update(data)
    return out


def _read_yaml(text: str, path: Path) -> dict:
    try:
        import yaml
    except ImportError:  # a flat "key: value" file (DPS's configs are) without PyYAML
        out = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            key, sep, raw = line.partition(":")
            if not sep or line[0].isspace():
                raise CheckpointError(f"{path}: nested YAML needs PyYAML (pip install pyyaml)") from None
            raw = raw.strip()
            try:
                out[key.strip()] = json.loads(raw.lower() if raw in ("True", "False") else raw)
            except json.JSONDecodeError:
                out[key.strip()] = raw.strip("'\"")
        return out
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({e})") from None


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise PickledCheckpointError(f"{path} is a pickle (code, not just weights). {CONVERT_HINT}")


def load_state_dict_file(path: str | Path) -> dict:
    """A plain state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (``weights_only=True``).

    Refuses pickles with code and files that do not hold a mapping of tensors."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch styles its message for terminals
        first = text.splitlines()[0] if text else type(e).__name__
        raise PickledCheckpointError(f"{path} holds pickled code, not a plain state dict ({first}). "
                                     f"{CONVERT_HINT}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a PyTorch weights file ({e})") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict (parameter names -> "
                              "tensors); save one with torch.save(net.state_dict(), 'weights.pt')")
    return dict(sd)


def channel_names(c: int) -> list[str]:
    return {1: ["gray"], 3: ["r", "g", "b"]}.get(c, [f"c{i}" for i in range(c)])


def vp_alphas_cumprod(schedule: Mapping[str, Any]) -> torch.Tensor:
    """``alpha_bar_t`` (float64) of a card's VP ``parameterization.schedule``."""
    from .adapters import adm_alphas_cumprod
    from .diffusers_adapter import diffusers_alphas_cumprod

    family = schedule.get("family")
    if family == "guided-diffusion":
        return adm_alphas_cumprod(int(schedule.get("num_timesteps", 1000)), schedule.get("noise_schedule", "linear"))
    if family == "diffusers":
        return diffusers_alphas_cumprod({k: v for k, v in schedule.items() if k != "family"})
    raise CheckpointError(f"unknown schedule family {family!r} (guided-diffusion or diffusers)")


def _sigma_range(abar: torch.Tensor) -> tuple[float, float]:
    a = abar.double()
    sig = torch.sqrt((1 - a) / a)
    return float(sig[0]), float(sig[-1])


def image_card(*, model_id: str, shape, architecture: dict, parameterization: dict, abar: torch.Tensor,
               source: dict, description: str | None, value_range=(0.0, 1.0)) -> dict:
    """The card of an imported image model (network space ``[-1, 1]``, physical ``[0, 1]``)."""
    c = int(shape[0])
    smin, smax = _sigma_range(abar)
    return {
        "id": model_id,
        "kind": "image",
        "shape": [int(s) for s in shape],
        "channels": channel_names(c),
        "architecture": architecture,
        "parameterization": parameterization,
        "sigma_min": smin,
        "sigma_max": smax,
        "normalization": {"shift": [0.5] * c, "scale": [0.5] * c,
                          "meaning": "x_phys = shift + scale * x_net (per channel); the network works on "
                                     "[-1, 1], images are served in [0, 1]"},
        "pde": None,
        "value_range": list(value_range),
        "description": description or (f"{source['format']} model imported from {source['file']} "
                                       f"({'x'.join(map(str, shape))}); trained on data not described by its source."),
        "training": {"data": "not stated by the source checkpoint (imported)", "source": source},
        "methods": [dict(m) for m in DEFAULT_METHODS],
    }


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if (out / CARD).exists() and not overwrite:
        raise CheckpointError(f"{out} already holds a model (card.json); pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out
