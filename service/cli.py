"""``reconserve``: models, solve (locally or through a server), data, train, serve."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def encode_file(path: Path) -> dict:
    """An array or lab file (or a folder of DICOM files) as the API's encoding of it, so the
    server's decoders (scaling, channel order, geometry, checks) read it exactly as they read any
    request (``reconserve_client.encode_path``)."""
    from reconserve_client import encode_path
    return encode_path(path)


def _load_array(value, base: Path):
    """Paths to array files inside an operator JSON, relative to it, as their encoding."""
    from reconserve_client import SUFFIXES
    if isinstance(value, str) and value.lower().endswith(tuple(SUFFIXES)):
        return encode_file((base / value) if not Path(value).is_absolute() else Path(value))
    if isinstance(value, dict):
        return {k: _load_array(v, base) for k, v in value.items()}
    return value


def _parse_params(items) -> dict:
    out = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_models(args) -> int:
    from models.checkpoint import load_models
    from service.settings import Settings
    folders = [f for f in (args.models,) if f]
    models = load_models(Settings().checkpoints_dir, *folders)
    for mid, m in models.items():
        c = m.card
        methods = ", ".join(x["name"] for x in c.get("methods") or [])
        print(f"{mid:14s} {c['kind']:8s} {'x'.join(map(str, c['shape'])):10s} channels={','.join(c['channels'])}  methods: {methods}")
    return 0


def cmd_solve(args) -> int:
    """One reconstruction, locally (the server's validation and sampler driver, in this process)
    or through a server (``--server``; progress from its event stream). Bad input: a clear
    message and exit code 2, never a traceback."""
    from tqdm import tqdm

    from reconserve_client import Client, ServiceError, result_format
    from service.codecs import CodecError
    from service.errors import ApiError

    try:
        op_path = Path(args.operator)
        spec = _load_array(json.loads(op_path.read_text()), op_path.parent)
        y = encode_file(Path(args.observation))
        out_format = None if args.out.lower().endswith(".npz") else result_format(args.out)
    except (OSError, ValueError) as e:
        print(f"error: cannot read the operator or observation, or write --out: {e}", file=sys.stderr)
        return 2
    params = _parse_params(args.param)
    if args.steps is not None:
        params["steps"] = args.steps
    method = {"name": args.method, **params} if args.method else (params or None)
    body = Client._body(args.model, spec, y, args.noise_sigma, method, args.samples, args.seed,
                        {"kind": args.pde} if args.pde else None, ("mean", "std", "samples"), args.completion,
                        args.value_window)
    bars: list = []  # made at the first progress event (none when the request is refused)

    def progress(e):
        step, total = (e["progress"]["step"], e["progress"]["total"]) if "progress" in e else (e["i"] + 1, e["total"])
        if not bars:
            bars.append(tqdm(unit="step", total=total, file=sys.stderr))
        bars[0].total, bars[0].n = total, step
        bars[0].refresh()
    try:
        if args.server:
            with Client(args.server, api_key=args.api_key) as client:
                job_id = client.submit_body(body)
                progress(client.wait(job_id, progress=progress))
                res = client.result(job_id)
                if out_format is not None:
                    client.save_result(job_id, args.out)
        else:
            res, result_file = _solve_locally(body, args, progress)
            if out_format is not None:
                from reconserve_client import write_result_file
                write_result_file(args.out, result_file(out_format))
    except (ApiError, ServiceError, CodecError) as e:  # (CodecError: a result the --out format cannot hold)
        message = getattr(e, "message", str(e))
        print(f"\nerror: {e.code}: {message}" if bars else f"error: {e.code}: {message}", file=sys.stderr)
        return 2
    finally:
        for bar in bars:
            bar.close()
    meta = {k: v for k, v in res.items() if not isinstance(v, np.ndarray) and v is not None}
    if out_format is None:
        np.savez(args.out, **{k: v for k, v in res.items() if isinstance(v, np.ndarray)},
                 meta=np.asarray(json.dumps(meta)))
    print(json.dumps(meta))
    return 0


def _solve_locally(body: dict, args, progress):
    """The request as the server would run it alone: ``prepare.admit`` and ``build`` (every check
    the server makes), then ``guidance.solve.solve_batch`` (sampling, completion, metrics; a
    volume's slices as the worker runs them); torch threads as the server's default. Returns
    ``(the result, in the data's units, and result_file(format) -> bytes)``."""
    import torch

    from guidance.registry import METHODS
    from guidance.solve import solve_batch
    from models.checkpoint import load_models
    from operators.spec import OPERATORS
    from service.codecs import npy_bytes
    from service.labfiles import LAB_RECORD, Window, read_lab_record
    from service.labfiles.results import Samples, field_array, result_file
    from service.prepare import admit, build
    from service.schemas import make_request_model
    from service.settings import Settings
    from service.stack import job_items, job_outcomes

    settings = Settings()
    torch.set_num_threads(args.threads or settings.torch_threads or torch.get_num_threads())
    models = load_models(settings.checkpoints_dir, *([args.models] if args.models else []))
    p, arrays, _ = build(admit(body, make_request_model(list(OPERATORS), list(METHODS)), models, settings), settings)
    with torch.no_grad():
        run = solve_batch(p.model, p.plan, job_items(p), noise_sigma=p.noise_sigma, pde=p.pde, device=settings.device,
                          callback=progress, chunk=settings.slice_chunk if p.volume is not None else None)
    out = job_outcomes([p], run.items)[0]
    if out.error is not None:
        raise out.error
    lab = read_lab_record(npy_bytes(arrays[LAB_RECORD]) if LAB_RECORD in arrays else None)
    stats, window = Samples(out.samples.float().cpu().numpy()), Window(*lab["window"])
    res = {"mean": field_array(stats, "mean", window),
           "std": field_array(stats, "std", window) if stats.std is not None else None,
           "samples": field_array(stats, "samples", window), "nfe": run.nfe, "elapsed_s": run.seconds,
           "seed": p.seed, "method": p.plan.describe(), "metrics": out.metrics, "model": p.model_id}
    return res, lambda fmt: result_file(fmt, "mean", stats, lab)


def cmd_serve(args) -> int:
    if args.ray:
        from service.ray_serve import serve_ray
        overrides = {k: str(v) for k, v in (("models_dir", args.models), ("device", args.device),
                                            ("data_dir", args.data_dir)) if v is not None}
        serve_ray(args.host, args.port, overrides, address=args.ray_address, num_cpus=args.ray_cpus)
        return 0
    from service.server import serve
    serve(host=args.host, port=args.port, models_dir=args.models, device=args.device, data_dir=args.data_dir)
    return 0


def cmd_import(args) -> int:
    """Import an outside checkpoint into a servable folder (safetensors + card.json)."""
    from models.checkpoint import CheckpointError
    from models.formats import import_model

    try:
        folder = import_model(args.format, args.source, args.out, model_id=args.id, config=args.config,
                              description=args.description, overwrite=args.overwrite)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"reconserve import: {e}", file=sys.stderr)
        return 2
    card = json.loads((Path(folder) / "card.json").read_text())
    p = card["parameterization"]
    src = (card.get("training") or {}).get("source") or {}
    print(f"wrote {folder}: model {card['id']!r}, {card['kind']} {'x'.join(map(str, card['shape']))} "
          f"channels={','.join(card['channels'])} value_range={card.get('value_range')}")
    print(f"  {card['architecture']['name']} network, {p.get('kind')} {p.get('prediction', '')}, "
          f"sigma {card['sigma_min']:.4g}..{card['sigma_max']:.4g}, default method {(card.get('methods') or [{}])[0]}")
    if src.get("inferred"):
        print(f"  not stored in the weights, assumed: {', '.join(src['inferred'])} "
              f"(see training.source.settings in the card; pass --config to set them)")
    print(f"serve it: reconserve serve --models {Path(folder).parent}")
    return 0


def _add_solve_arguments(s: argparse.ArgumentParser) -> None:
    """``reconserve solve``'s options."""
    s.add_argument("--model", required=True, help="the model id (see `reconserve models`)")
    s.add_argument("--operator", required=True, help="operator JSON (arrays as lists, {'npy': b64} or file paths)")
    s.add_argument("--observation", required=True,
                   help=".npy, .png, .tif (pages: slices), .nii / .nii.gz, or a DICOM series (.zip or a folder)")
    s.add_argument("--value-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the data's units mapped to the model's value range (and the results back), e.g. "
                        "-1000 1000 for CT in HU")
    s.add_argument("--method", default=None, help="fast, dps, ald, diffusion_pde (default: the model card's)")
    s.add_argument("--steps", type=int, default=None,
                   help="sampler steps (method.steps; default: the model card's for the method)")
    s.add_argument("--samples", type=int, default=1, help="posterior samples to draw (num_samples) [1]")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples [0]")
    s.add_argument("--noise-sigma", type=float, default=0.0,
                   help="standard deviation of the observation noise, physical units [0]")
    s.add_argument("--pde", default=None, help="add the model's PDE residual term, e.g. darcy")
    s.add_argument("--completion", default="auto", choices=["auto", "solve", "off"],
                   help="PDE models: re-solve u from each sample's a (auto: when u is unobserved)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="a method parameter (repeatable)")
    s.add_argument("--out", required=True,
                   help="result .npz (mean, std, samples, meta), or the mean as .nii / .nii.gz, a DICOM .zip, "
                        ".tif or .npy, in the observation's geometry")
    s.add_argument("--models", help="an extra folder of checkpoints")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the server's, RECONSERVE_TORCH_THREADS, 1)")
    s.add_argument("--server", default=None, help="send to a reconserve server at this URL instead")
    s.add_argument("--api-key", default=None, help="with --server: the server's API key (X-API-Key)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the available models")
    m.add_argument("--models", help="an extra folder of checkpoints")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("solve", help="reconstruct from an observation (locally, or with --server)")
    _add_solve_arguments(s)
    s.set_defaults(func=cmd_solve)

    v = sub.add_parser("serve", help="start the HTTP server")
    v.add_argument("--host", default="127.0.0.1", help="the address to listen on [127.0.0.1]")
    v.add_argument("--port", type=int, default=8000, help="the port to listen on [8000]")
    v.add_argument("--models", default=None, help="an extra folder of checkpoints")
    v.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: RECONSERVE_DEVICE, else auto)")
    v.add_argument("--data-dir", default=None,
                   help="the durable job store (default: RECONSERVE_DATA_DIR, else var/ beside the checkout)")
    v.add_argument("--ray", action="store_true",
                   help="run on Ray Serve: an ingress and autoscaled worker replicas sharing the job store "
                        "(RECONSERVE_DATABASE_URL: PostgreSQL; see README 'Scale-out on Ray Serve')")
    v.add_argument("--ray-address", default=None,
                   help="with --ray: the Ray cluster to join (default: RECONSERVE_RAY_ADDRESS, else a new "
                        "local one)")
    v.add_argument("--ray-cpus", type=int, default=None, help="with --ray: CPUs of a new local Ray cluster")
    v.set_defaults(func=cmd_serve)

    i = sub.add_parser("import", help="import an outside checkpoint (guided-diffusion/ADM, diffusers) for serving",
                       description="Write a servable folder (weights.safetensors + card.json) from an outside "
                                   "checkpoint; `reconserve serve --models DIR` serves every such folder in DIR. "
                                   "Pickles with code (an EDM .pkl) are refused.")
    i.add_argument("format", choices=["adm", "diffusers", "reconserve", "auto"],
                   help="adm: a guided-diffusion .pt/.pth state dict (or .safetensors); diffusers: a UNet2DModel "
                        "folder or a pipeline folder with unet/ and scheduler/; reconserve: a card.json folder; "
                        "auto: detect")
    i.add_argument("source", help="the checkpoint file or folder")
    i.add_argument("--out", required=True, help="the folder to write (e.g. models/ffhq-256)")
    i.add_argument("--id", default=None, help="the model id (default: the --out folder's name)")
    i.add_argument("--config", action="append", metavar="FILE",
                   help="YAML or JSON settings (repeatable, later files win): for adm the guided-diffusion keys of "
                        "DPS's model_config.yaml / diffusion_config.yaml (image_size, num_channels, num_res_blocks, "
                        "attention_resolutions, channel_mult, learn_sigma, num_heads, num_head_channels, "
                        "noise_schedule, ...); for diffusers scheduler keys and image_size")
    i.add_argument("--description", default=None, help="the card's description (what the model was trained on)")
    i.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    i.set_defaults(func=cmd_import)

    from models.cli_args import add_data_arguments, add_train_arguments  # (no torch)

    t = sub.add_parser("train", help="train a prior (EDM score matching), resumable")
    add_train_arguments(t)
    t.set_defaults(func=_run_train)
    d = sub.add_parser("data", help="generate a data set as .npy shards")
    add_data_arguments(d)
    d.set_defaults(func=_run_data)
    return p


def _run_train(args) -> int:
    from models.train import run_train
    run_train(args)
    return 0


def _run_data(args) -> int:
    from models.data import run_data
    run_data(args)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
