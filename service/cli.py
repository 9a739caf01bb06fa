"""``reconserve``: models, solve (locally or through a server), data, train, serve."""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np


def _load_array(value, base: Path):
    """An array in an operator JSON: nested list, ``{"npy": base64}``, or a path to .npy/.png/.tif."""
    if isinstance(value, str) and value.lower().endswith((".npy", ".png", ".tif", ".tiff")):
        p = (base / value) if not Path(value).is_absolute() else Path(value)
        return read_array_file(p)
    if isinstance(value, dict) and set(value) == {"npy"}:
        return np.load(io.BytesIO(base64.b64decode(value["npy"])), allow_pickle=False)
    if isinstance(value, list):
        return np.asarray(value)
    if isinstance(value, dict):
        return {k: _load_array(v, base) for k, v in value.items()}
    return value


def read_array_file(path: Path) -> np.ndarray:
    """.npy as is; 8-bit images /255, 16-bit /65535, float TIFF as is."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
        import tifffile
        a = tifffile.imread(path)
    else:
        from PIL import Image
        a = np.asarray(Image.open(path))
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535
    return a.astype(np.float64)


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
    folders = [f for f in (args.models,) if f]
    from models.checkpoint import default_checkpoint_dir
    models = load_models(default_checkpoint_dir(), *folders)
    for mid, m in models.items():
        c = m.card
        methods = ", ".join(x["name"] for x in c.get("methods") or [])
        print(f"{mid:14s} {c['kind']:8s} {'x'.join(map(str, c['shape'])):10s} channels={','.join(c['channels'])}  methods: {methods}")
    return 0


def cmd_solve(args) -> int:
    op_path = Path(args.operator)
    spec = json.loads(op_path.read_text())
    spec = _load_array(spec, op_path.parent)
    y = read_array_file(Path(args.observation))
    if y.ndim == 2:  # a grayscale image: one channel
        y = y[None]
    params = _parse_params(args.param)
    if args.steps is not None:
        params["steps"] = args.steps
    pde_spec = {"kind": args.pde} if args.pde else None
    if args.server:
        from service.client import Client
        client = Client(args.server, api_key=args.api_key)
        res = client.reconstruct(args.model, spec, y, noise_sigma=args.noise_sigma,
                                 method=({"name": args.method, **params} if args.method else (params or None)),
                                 num_samples=args.samples, seed=args.seed, pde=pde_spec,
                                 return_=("mean", "std", "samples"), completion=args.completion)
        out = {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    else:
        import torch
        from tqdm import tqdm

        from guidance.solve import solve
        from models.checkpoint import default_checkpoint_dir, load_models
        from operators.spec import build_operator, build_pde
        torch.set_num_threads(args.threads) if args.threads else None
        models = load_models(default_checkpoint_dir(), *([args.models] if args.models else []))
        if args.model not in models:
            print(f"unknown model {args.model!r}; known: {sorted(models)}", file=sys.stderr)
            return 2
        model = models[args.model]
        shape = tuple(model.card["shape"])
        operator = build_operator(spec, shape)
        pde = build_pde(pde_spec, shape, model.card.get("pde") or {}) if pde_spec else None
        bar = tqdm(unit="step", file=sys.stderr)

        def progress(e):
            bar.total = e["total"]
            bar.update(1)
        sol = solve(model, operator, y, noise_sigma=args.noise_sigma, pde=pde, method=args.method,
                    params=params, num_samples=args.samples, seed=args.seed, callback=progress,
                    completion=args.completion)
        bar.close()
        out = {"mean": sol.mean, "samples": sol.samples}
        if sol.std is not None:
            out["std"] = sol.std
        meta = {"nfe": sol.nfe, "elapsed_s": sol.elapsed_s, "seed": sol.seed, "method": sol.method,
                "metrics": sol.metrics, "model": args.model}
    np.savez(args.out, **out, meta=np.asarray(json.dumps(meta)))
    print(json.dumps(meta))
    return 0


def cmd_serve(args) -> int:
    from service.server import serve
    serve(host=args.host, port=args.port, models_dir=args.models, device=args.device, data_dir=args.data_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the available models")
    m.add_argument("--models", help="an extra folder of checkpoints")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("solve", help="reconstruct from an observation (locally, or with --server)")
    s.add_argument("--model", required=True)
    s.add_argument("--operator", required=True, help="operator JSON (arrays as lists, {'npy': b64} or file paths)")
    s.add_argument("--observation", required=True, help=".npy, .png or .tif")
    s.add_argument("--method", default=None, help="fast, dps, ald, diffusion_pde (default: the model card's)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--noise-sigma", type=float, default=0.0)
    s.add_argument("--pde", default=None, help="add the model's PDE residual term, e.g. darcy")
    s.add_argument("--completion", default="auto", choices=["auto", "solve", "off"],
                   help="PDE models: re-solve u from each sample's a (auto: when u is unobserved)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="a method parameter (repeatable)")
    s.add_argument("--out", required=True, help="result .npz (mean, std, samples, meta)")
    s.add_argument("--models", help="an extra folder of checkpoints")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--server", default=None, help="send to a reconserve server at this URL instead")
    s.add_argument("--api-key", default=None)
    s.set_defaults(func=cmd_solve)

    v = sub.add_parser("serve", help="start the HTTP server")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--models", default=None, help="an extra folder of checkpoints")
    v.add_argument("--device", default=None, choices=["cpu", "cuda"])
    v.add_argument("--data-dir", default=None,
                   help="the durable job store (default: RECONSERVE_DATA_DIR, else var/ beside the checkout)")
    v.set_defaults(func=cmd_serve)

    try:
        from models.train import add_train_arguments, run_train
        t = sub.add_parser("train", help="train a prior (EDM score matching), resumable")
        add_train_arguments(t)
        t.set_defaults(func=lambda a: (run_train(a), 0)[1])
        from models.data import add_data_arguments, run_data
        d = sub.add_parser("data", help="generate a data set as .npy shards")
        add_data_arguments(d)
        d.set_defaults(func=lambda a: (run_data(a), 0)[1])
    except ImportError:  # pragma: no cover - training extras missing
        pass
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
