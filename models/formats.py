"""Model formats: one registry that imports outside checkpoints into servable folders and loads them back.

A *servable folder* is what :mod:`models.checkpoint` reads: ``weights.safetensors`` plus
``card.json``. Its card's ``architecture.name`` says which network to rebuild, so that loading
needs neither the network nor pickle:

=============  ==========================================  =========================================
format         source                                      card ``architecture`` / parameterization
=============  ==========================================  =========================================
``reconserve`` a folder with ``card.json`` + safetensors   ``unet`` (ours), EDM preconditioning
``adm``        a guided-diffusion state dict (``.pt`` /    ``adm``: guided-diffusion's ``UNetModel``
               ``.pth`` via ``torch.load(weights_only=      settings; VP (DDPM) eps, its beta schedule
               True)``, or ``.safetensors``) + settings
``diffusers``  a ``UNet2DModel`` folder (``config.json`` +  ``diffusers``: the UNet's config; VP with
               weights [+ ``scheduler_config.json``]) or    the scheduler's betas and prediction type
               a pipeline folder (``unet/``, ``scheduler/``)
=============  ==========================================  =========================================

:data:`FORMATS` maps each name to an object with ``detect(source) -> bool``,
``import_(source, out, ...) -> Path`` (``import`` is a Python keyword) and
``load(folder, card) -> Denoiser``. ``reconserve import FORMAT SOURCE --out FOLDER`` calls
:func:`import_model`; :func:`models.checkpoint.load_checkpoint` calls :func:`load_denoiser`.

Imported image models are described in ``[0, 1]`` (``value_range``) while the network works on
``[-1, 1]``: the card's ``normalization`` is ``shift = scale = 0.5`` per channel
(``x_phys = shift + scale * x_net``). ``sigma_min``/``sigma_max`` are those of the discrete
schedule, ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` at ``t = 0`` and ``t = T - 1``.

Pickles with code (an EDM ``.pkl``, a ``.pt`` holding a whole ``nn.Module``) are refused with
:class:`PickledCheckpointError`, whose message says how to turn them into a plain state dict.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from .card import (CARD, DEFAULT_METHODS, WEIGHTS, CheckpointError, build_network, read_card,  # noqa: F401
                   save_checkpoint, utc_now, wrap_network)
from .denoiser import Denoiser, VPDenoiser
from .format_io import (TORCH_SUFFIXES, PickledCheckpointError, image_card, prepare_out,  # noqa: F401
                        load_state_dict_file, read_config, refuse_pickle, sha256_file, vp_alphas_cumprod)

__all__ = ["FORMATS", "ModelFormat", "PickledCheckpointError", "detect_format", "import_model", "load_denoiser",
           "read_config", "vp_alphas_cumprod", "DEFAULT_METHODS"]


# ----------------------------------------------------------------------------- formats
class ModelFormat:
    """One checkpoint format: ``detect``, ``import_`` into a servable folder, ``load`` it back."""

    name: str = ""
    summary: str = ""
    #: the card ``architecture.name`` values this format rebuilds
    architectures: tuple[str, ...] = ()

    def detect(self, source: Path) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def import_(self, source: str | Path, out: str | Path, *, model_id: str | None = None, config=None,
                description: str | None = None, overwrite: bool = False) -> Path:  # pragma: no cover
        raise NotImplementedError

    def load(self, folder: Path, card: dict) -> Denoiser:  # pragma: no cover - abstract
        raise NotImplementedError


class ReconserveFormat(ModelFormat):
    name = "reconserve"
    summary = "a reconserve folder (card.json + weights.safetensors), e.g. from `reconserve train`"
    architectures = ("unet",)

    def detect(self, source: Path) -> bool:
        return source.is_dir() and (source / CARD).is_file() and (source / WEIGHTS).is_file()

    def import_(self, source, out, *, model_id=None, config=None, description=None, overwrite=False) -> Path:
        src = Path(source)
        if not self.detect(src):
            raise CheckpointError(f"{src}: not a reconserve folder (needs {CARD} and {WEIGHTS})")
        card = json.loads((src / CARD).read_text())
        if config:
            raise CheckpointError("--config does not apply to a reconserve folder (its card says everything)")
        out = prepare_out(out, overwrite)
        card["id"] = model_id or (card.get("id") if out.resolve() == src.resolve() else out.name)
        if description:
            card["description"] = description
        if out.resolve() != src.resolve():
            shutil.copyfile(src / WEIGHTS, out / WEIGHTS)
        (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
        return out

    def load(self, folder: Path, card: dict) -> Denoiser:
        net = build_network(card["architecture"])
        net.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
        return wrap_network(net, card)


class _TimestepScale(torch.nn.Module):
    """improved-diffusion's ``rescale_timesteps``: the network saw ``t * 1000 / T``."""

    def __init__(self, net: torch.nn.Module, factor: float):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x_t, t):
        return self.net(x_t, t * self.factor)


class ADMFormat(ModelFormat):
    name = "adm"
    summary = ("a guided-diffusion/ADM UNet state dict (.pt/.pth loaded with weights_only=True, or .safetensors), "
               "with its model_config.yaml via --config (what the weights determine is read off them)")
    architectures = ("adm",)

    def detect(self, source: Path) -> bool:
        if not source.is_file() or source.suffix.lower() not in TORCH_SUFFIXES + (".safetensors",):
            return False
        if source.suffix.lower() == ".safetensors":  # the keys alone, without reading the tensors
            from safetensors import safe_open

            try:
                with safe_open(str(source), "pt") as f:
                    keys = list(f.keys())
            except Exception:  # noqa: BLE001 - not a safetensors file
                return False
            return all(any(k.endswith(n) for k in keys) for n in ("input_blocks.0.0.weight", "time_embed.0.weight"))
        try:
            from .adapters import _normalize_adm_state_dict

            sd = _normalize_adm_state_dict(load_state_dict_file(source))
        except (CheckpointError, ValueError):
            return False
        return "input_blocks.0.0.weight" in sd and "time_embed.0.weight" in sd

    def import_(self, source, out, *, model_id=None, config=None, description=None, overwrite=False) -> Path:
        from .adapters import ADMUNet, _normalize_adm_state_dict, adm_settings

        src = Path(source)
        given = read_config(config) if not isinstance(config, Mapping) else dict(config)
        sd = load_state_dict_file(src)  # refuses pickles with code
        try:
            sd = _normalize_adm_state_dict(sd)
            args, settings, inferred = adm_settings(given, sd)
        except ValueError as e:
            raise CheckpointError(f"{src}: {e}") from None
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        unet = ADMUNet(**args)
        missing, unexpected = unet.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{src}: the weights do not fit guided-diffusion's UNet with these settings: missing "
                f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                f"{'...' if len(unexpected) > 4 else ''}; check --config (num_res_blocks, channel_mult, "
                "attention_resolutions, learn_sigma, resblock_updown, use_scale_shift_norm)")
        size, c = int(settings["image_size"]), int(args["in_channels"])
        schedule = {"family": "guided-diffusion", "noise_schedule": settings["noise_schedule"],
                    "num_timesteps": int(settings["diffusion_steps"])}
        try:
            abar = vp_alphas_cumprod(schedule)
        except ValueError as e:
            raise CheckpointError(f"{src}: {e}") from None
        param = {"kind": "vp", "prediction": "x0" if settings["predict_xstart"] else "eps", "out_channels": c,
                 "schedule": schedule, "rescale_timesteps": bool(settings["rescale_timesteps"]),
                 "timesteps": "fractional: log sigma interpolated between the trained levels"}
        out = prepare_out(out, overwrite)
        source_info = {"format": self.name, "file": src.name, "sha256": sha256_file(src), "config": given,
                       "settings": settings, "inferred": inferred, "imported": utc_now()}
        card = image_card(model_id=model_id or out.name, shape=(c, size, size),
                          architecture={"name": "adm", "args": args}, parameterization=param, abar=abar,
                          source=source_info, description=description)
        save_checkpoint(out, unet, card)
        return out

    def load(self, folder: Path, card: dict) -> Denoiser:
        from .adapters import ADMNet, ADMUNet

        unet = ADMUNet(**card["architecture"]["args"])
        unet.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
        unet.eval()
        p = card["parameterization"]
        abar = vp_alphas_cumprod(p["schedule"])
        net: torch.nn.Module = ADMNet(unet)
        if p.get("rescale_timesteps"):
            net = _TimestepScale(net, 1000.0 / len(abar))
        return VPDenoiser(net, abar, tuple(card["shape"]), parameterization=p.get("prediction", "eps"),
                          out_channels=int(p.get("out_channels", card["shape"][0])))


class DiffusersFormat(ModelFormat):
    name = "diffusers"
    summary = ("a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors [+ "
               "scheduler_config.json]) or a pipeline folder with unet/ and scheduler/")
    architectures = ("diffusers",)
    _WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    _SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "rescale_betas_zero_snr")

    @staticmethod
    def _layout(source: Path) -> tuple[Path, Path] | None:
        """``(unet_dir, scheduler_config_path)`` of a pipeline or flat folder."""
        if (source / "unet" / "config.json").is_file():
            return source / "unet", source / "scheduler" / "scheduler_config.json"
        if (source / "config.json").is_file():
            return source, source / "scheduler_config.json"
        return None

    def detect(self, source: Path) -> bool:
        return source.is_dir() and self._layout(source) is not None

    def import_(self, source, out, *, model_id=None, config=None, description=None, overwrite=False) -> Path:
        from .diffusers_adapter import DIFFUSERS_SCHEDULER_DEFAULTS, _PREDICTION_TYPES, diffusers_denoiser

        src = Path(source)
        layout = self._layout(src) if src.is_dir() else None
        if layout is None:
            raise CheckpointError(f"{src}: not a diffusers folder (needs config.json, or unet/config.json "
                                  "and scheduler/scheduler_config.json)")
        unet_dir, sched_path = layout
        ucfg = json.loads((unet_dir / "config.json").read_text())
        cls = ucfg.get("_class_name", "UNet2DModel")
        if cls != "UNet2DModel":
            raise CheckpointError(f"{unet_dir}: a {cls}; only unconditional pixel-space UNet2DModel DDPMs "
                                  "are supported (not latent or text-conditioned pipelines)")
        wfile = next((unet_dir / w for w in self._WEIGHTS if (unet_dir / w).is_file()), None)
        if wfile is None:
            raise CheckpointError(f"{unet_dir}: no {' or '.join(self._WEIGHTS)}")
        given = read_config(config) if not isinstance(config, Mapping) else dict(config)
        scfg = json.loads(sched_path.read_text()) if sched_path.is_file() else {}
        scfg.update({k: v for k, v in given.items() if k in DIFFUSERS_SCHEDULER_DEFAULTS})
        unknown = sorted(set(given) - set(DIFFUSERS_SCHEDULER_DEFAULTS) - {"image_size"})
        if unknown:
            raise CheckpointError(f"unknown settings {unknown} for a diffusers model; --config takes scheduler keys "
                                  f"{sorted(DIFFUSERS_SCHEDULER_DEFAULTS)} and image_size")
        cfg = {k: v for k, v in ucfg.items() if not k.startswith("_")}
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise CheckpointError("importing a diffusers model needs the diffusers package "
                                  "(pip install diffusers)") from None
        unet = UNet2DModel.from_config(cfg)
        try:
            unet.load_state_dict(load_state_dict_file(wfile), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{wfile}: the weights do not fit {unet_dir / 'config.json'}: "
                                  f"{str(e)[:400]}") from None
        size = given.get("image_size", cfg.get("sample_size"))
        if size is None:
            raise CheckpointError(f"{unet_dir}/config.json has no sample_size: give image_size in --config")
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        c = int(cfg["in_channels"])
        full = {**DIFFUSERS_SCHEDULER_DEFAULTS, **{k: v for k, v in scfg.items() if v is not None}}
        try:
            den = diffusers_denoiser(unet, full, shape=(c, *hw))  # validates: no VE/fourier, no class labels
        except ValueError as e:
            raise CheckpointError(f"{src}: {e}") from None
        schedule = {"family": "diffusers", **{k: full[k] for k in self._SCHEDULE_KEYS}}
        param = {"kind": "vp", "prediction": den.parameterization, "out_channels": c, "schedule": schedule,
                 "prediction_type": full["prediction_type"],
                 "timesteps": ("rounded (learned time embedding)" if cfg.get("time_embedding_type") == "learned"
                               else "fractional: log sigma interpolated between the trained levels")}
        assert _PREDICTION_TYPES[full["prediction_type"]] == den.parameterization
        out = prepare_out(out, overwrite)
        source_info = {"format": self.name, "file": str(wfile.relative_to(src)), "folder": src.name,
                       "sha256": sha256_file(wfile),
                       "scheduler": (scfg if sched_path.is_file()
                                     else "DDPMScheduler defaults (no scheduler_config.json)"),
                       "config": given, "imported": utc_now()}
        card = image_card(model_id=model_id or out.name, shape=(c, *hw),
                          architecture={"name": "diffusers", "args": {"class": "UNet2DModel", "config": cfg}},
                          parameterization=param, abar=vp_alphas_cumprod(schedule),
                          source=source_info, description=description)
        save_checkpoint(out, unet, card)
        return out

    def load(self, folder: Path, card: dict) -> Denoiser:
        from .diffusers_adapter import diffusers_denoiser

        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise CheckpointError(f"{folder}: serving a diffusers model needs the diffusers package "
                                  "(pip install diffusers)") from None
        arch = card["architecture"]["args"]
        unet = UNet2DModel.from_config(dict(arch["config"]))
        unet.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
        p = card["parameterization"]
        sched = {k: v for k, v in p["schedule"].items() if k != "family"}
        return diffusers_denoiser(unet, sched, parameterization=p["prediction"], shape=tuple(card["shape"]))


FORMATS: dict[str, ModelFormat] = {f.name: f for f in (ReconserveFormat(), ADMFormat(), DiffusersFormat())}


# ----------------------------------------------------------------------------- entry points
def detect_format(source: str | Path) -> str:
    """The name of the format ``source`` is in (pickles refused); ``CheckpointError`` if none fits."""
    src = Path(source)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    refuse_pickle(src)
    for name, fmt in FORMATS.items():
        if fmt.detect(src):
            return name
    if src.is_file() and src.suffix.lower() in TORCH_SUFFIXES:
        load_state_dict_file(src)  # raises the pickle refusal where that is the reason
    raise CheckpointError(f"{src}: not a format reconserve imports; formats: "
                          + "; ".join(f"{n}: {f.summary}" for n, f in FORMATS.items()))


def import_model(fmt: str, source: str | Path, out: str | Path, *, model_id: str | None = None, config=None,
                 description: str | None = None, overwrite: bool = False, check: bool = True) -> Path:
    """Import ``source`` (in format ``fmt``, or ``"auto"``) into the servable folder ``out``.

    ``config``: path(s) of YAML/JSON settings files or a dict. With ``check`` the written folder
    is loaded back as the server would load it and its denoiser called once on its own shape.
    """
    src = Path(source)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    refuse_pickle(src)
    name = detect_format(src) if fmt == "auto" else fmt
    if name not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; use one of {sorted(FORMATS)} or auto")
    folder = FORMATS[name].import_(src, out, model_id=model_id, config=config, description=description,
                                   overwrite=overwrite)
    if check:  # load it back as models.checkpoint.load_checkpoint does, call it once
        card = read_card(folder)
        den = load_denoiser(folder, card).eval()
        x = torch.randn((1, *card["shape"]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            d = den(x, 1.0)
        if d.shape != x.shape or not torch.isfinite(d).all():
            raise CheckpointError(f"{folder}: the imported model does not give finite outputs of shape {list(x.shape)}")
    return folder


def format_for_card(card: dict) -> ModelFormat:
    name = (card.get("architecture") or {}).get("name")
    for fmt in FORMATS.values():
        if name in fmt.architectures:
            return fmt
    from .unet import ARCHITECTURES

    if name in ARCHITECTURES:
        return FORMATS["reconserve"]
    known = sorted({a for f in FORMATS.values() for a in f.architectures} | set(ARCHITECTURES))
    raise CheckpointError(f"unknown architecture {name!r}; known: {known}")


def load_denoiser(folder: str | Path, card: dict) -> Denoiser:
    """The denoiser of a servable folder, rebuilt from its card (no network, no pickle)."""
    return format_for_card(card).load(Path(folder), card)
