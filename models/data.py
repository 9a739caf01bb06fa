"""Seeded, vectorized training-data generators (Darcy, Poisson, Helmholtz, phantoms) and folder loading.

Conventions follow DESIGN.md "Data conventions" exactly:

* Grid: ``N x N`` nodes on ``[0,1]^2`` including the boundary, ``h = 1/(N-1)``.
* Gaussian random field (Li et al. 2021 FNO / DiffusionPDE data):
  ``g = Re(IFFT2(xi * (4 pi^2 |k|^2 + tau^2)^(-alpha/2)))``, integer wavenumbers
  ``numpy.fft.fftfreq(N, 1/N)``, the ``k = 0`` mode zero, complex white noise ``xi``
  (real and imaginary parts standard normal), ``alpha = 2``, ``tau = 3``.
* Darcy: ``a = 12`` where ``g >= 0`` else ``3``; ``u = solve_darcy(a)`` (``f = 1``, ``u = 0`` on the boundary).
* Poisson / Helmholtz: source ``a = g * a_scale`` with ``a_scale = 1 / std(g over the whole
  generated set)`` (so the set has unit standard deviation; ``g`` has zero mean per sample
  because its ``k = 0`` mode is zero); ``u`` from ``solve_poisson`` / ``solve_helmholtz``
  (``k = 1``). The factor is returned with the data and stored in ``meta.json``.
* Phantoms: random Shepp-Logan-like images in ``[0, 1]``.

Every generator draws its random numbers per sample in a fixed order from
``numpy.random.default_rng(seed)``, so the same seed gives the same data whatever the
chunking (``write_shards`` writes exactly ``darcy_pairs(num, n, seed)`` split into shards).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .cli_args import KINDS, add_data_arguments  # noqa: F401 (re-exported: reconserve data)

PDE_KINDS = ("darcy", "poisson", "helmholtz")
DARCY_LOW, DARCY_HIGH = 3.0, 12.0
_CHUNK = 256  # samples generated at once (bounds memory)


# ----------------------------------------------------------------------------- GRF
def grf_spectrum_amplitude(n: int, alpha: float = 2.0, tau: float = 3.0) -> np.ndarray:
    """``(4 pi^2 |k|^2 + tau^2)^(-alpha/2)`` on the integer-wavenumber grid, ``k = 0`` set to zero."""
    k = np.fft.fftfreq(n, 1.0 / n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    amp = (4 * math.pi ** 2 * k2 + tau ** 2) ** (-alpha / 2)
    amp[0, 0] = 0.0
    return amp


def _grf_from_noise(noise: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """``noise``: ``[B, 2, N, N]`` standard normals (real, imaginary) -> ``g``: ``[B, N, N]`` float64."""
    n = noise.shape[-1]
    xi = noise[:, 0] + 1j * noise[:, 1]
    return np.fft.ifft2(xi * grf_spectrum_amplitude(n, alpha, tau), axes=(-2, -1)).real


def grf_coefficient(n: int, rng: np.random.Generator, alpha: float = 2.0, tau: float = 3.0,
                    num: int | None = None) -> np.ndarray:
    """One GRF sample ``g`` of shape ``[n, n]`` (or ``[num, n, n]`` when ``num`` is given), float64.

    ``g = Re(IFFT2(xi * (4 pi^2 |k|^2 + tau^2)^(-alpha/2)))`` with numpy's ``ifft2``
    normalization, ``k = 0`` mode zero, ``xi`` complex white noise drawn per sample as
    ``rng.standard_normal((2, n, n))`` (real part, imaginary part).
    """
    m = 1 if num is None else int(num)
    g = _grf_from_noise(rng.standard_normal((m, 2, n, n)), alpha, tau)
    return g[0] if num is None else g


def _grf_chunks(num: int, n: int, rng: np.random.Generator, alpha: float, tau: float,
                chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    done = 0
    while done < num:
        m = min(chunk, num - done)
        yield grf_coefficient(n, rng, alpha, tau, num=m)
        done += m


def darcy_coefficient(g: np.ndarray) -> np.ndarray:
    """Threshold a GRF: ``a = 12`` where ``g >= 0``, else ``3``."""
    return np.where(g >= 0, DARCY_HIGH, DARCY_LOW)


# ----------------------------------------------------------------------------- PDE pairs
def _solver(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    from operators import pde_solvers as S  # numpy and scipy only: no torch, nothing of the service

    return {"darcy": S.solve_darcy, "poisson": S.solve_poisson, "helmholtz": S.solve_helmholtz}[kind]


def _pde_chunks(kind: str, num: int, n: int, seed: int, chunk: int = _CHUNK,
                alpha: float = 2.0, tau: float = 3.0, dtype=np.float32) -> tuple[Iterator[np.ndarray], dict]:
    """Chunks ``[m, 2, n, n]`` (float32 by default) of (a, u) pairs, plus the data set's meta (scale factors)."""
    if kind not in PDE_KINDS:
        raise ValueError(f"unknown PDE kind {kind!r}; use one of {PDE_KINDS}")
    meta: dict = {"alpha": alpha, "tau": tau}
    a_scale = 1.0
    if kind != "darcy":
        # First pass: the GRF's standard deviation over the whole set (each sample has zero mean).
        # (per-sample sums, then one sum: the same bits whatever the chunking)
        ss = np.concatenate([np.square(g).sum(axis=(1, 2))
                             for g in _grf_chunks(num, n, np.random.default_rng(seed), alpha, tau, chunk)])
        a_scale = 1.0 / math.sqrt(float(np.sum(ss)) / (num * n * n))
        meta.update(a_scale=a_scale, a_scale_note="a = g * a_scale, a_scale = 1/std(g over the generated set)")
    else:
        meta.update(a_values=[DARCY_LOW, DARCY_HIGH], f=1.0)
    if kind == "helmholtz":
        meta["k"] = 1.0
    solve = _solver(kind)

    def gen() -> Iterator[np.ndarray]:
        for g in _grf_chunks(num, n, np.random.default_rng(seed), alpha, tau, chunk):
            a = darcy_coefficient(g) if kind == "darcy" else g * a_scale
            out = np.empty((len(a), 2, n, n), dtype=dtype)
            out[:, 0] = a
            for i in range(len(a)):
                out[i, 1] = solve(a[i])
            yield out

    return gen(), meta


def pde_pairs(kind: str, num: int, n: int, seed: int, dtype=np.float32) -> tuple[np.ndarray, dict]:
    """``(data [num, 2, n, n] with channels (a, u), meta)`` for ``kind`` in darcy/poisson/helmholtz.

    ``dtype=np.float64`` keeps the solver's exact output (residual at round-off level).
    """
    chunks, meta = _pde_chunks(kind, num, n, seed, dtype=dtype)
    return np.concatenate(list(chunks), axis=0), meta


def darcy_pairs(num: int, n: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Darcy pairs ``[num, 2, n, n]`` float32, channels ``(a, u)``: ``a`` in {3, 12}, ``-div(a grad u) = 1``."""
    return pde_pairs("darcy", num, n, seed, dtype)[0]


def poisson_pairs(num: int, n: int, seed: int, return_meta: bool = False, dtype=np.float32):
    """Poisson pairs ``[num, 2, n, n]``: ``laplace(u) = a``, ``a`` a GRF scaled to unit std over the set.

    With ``return_meta`` also returns ``{"a_scale": ...}`` (``a = g * a_scale``).
    """
    data, meta = pde_pairs("poisson", num, n, seed, dtype)
    return (data, meta) if return_meta else data


def helmholtz_pairs(num: int, n: int, seed: int, return_meta: bool = False, dtype=np.float32):
    """Helmholtz pairs ``[num, 2, n, n]``: ``laplace(u) + u = a`` (``k = 1``), ``a`` a unit-std GRF."""
    data, meta = pde_pairs("helmholtz", num, n, seed, dtype)
    return (data, meta) if return_meta else data


# ----------------------------------------------------------------------------- phantoms
_P_INNER_MAX = 8  # inner ellipses per phantom (3..8)
_P_FIELDS = 9 + 6 * _P_INNER_MAX  # uniforms drawn per phantom


def _ellipse_mask(X, Y, cx, cy, a, b, th):
    """Boolean ``[..., n, n]`` mask of ellipses given parameters of shape ``[...]``."""
    e = (slice(None),) * cx.ndim + (None, None)
    c, s = np.cos(th)[e], np.sin(th)[e]
    dx, dy = X - cx[e], Y - cy[e]
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    return (xr / a[e]) ** 2 + (yr / b[e]) ** 2 <= 1.0


def _phantom_chunk(u: np.ndarray, n: int) -> np.ndarray:
    """Phantoms ``[m, 1, n, n]`` from per-sample uniforms ``u [m, _P_FIELDS]``."""
    m = len(u)
    t = (np.arange(n) + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    X, Y = np.meshgrid(t, t, indexing="xy")  # rows = y, columns = x
    lerp = lambda v, lo, hi: lo + (hi - lo) * v  # noqa: E731
    px = 2.0 / n  # pixel size in these coordinates
    # Outer ellipse (skull): upright head, taller than wide, small tilt and offset.
    cx, cy = lerp(u[:, 0], -0.04, 0.04), lerp(u[:, 1], -0.04, 0.04)
    a_out, b_out = lerp(u[:, 2], 0.62, 0.78), lerp(u[:, 3], 0.78, 0.88)  # extent <= 0.92 of the half-width
    th = lerp(u[:, 4], -0.25, 0.25)
    rim = np.maximum(lerp(u[:, 5], 0.05, 0.09) * b_out, 1.6 * px)  # rim thickness, >= 1.6 px
    rim_val, interior = lerp(u[:, 6], 0.80, 1.00), lerp(u[:, 7], 0.10, 0.35)
    outer = _ellipse_mask(X, Y, cx, cy, a_out, b_out, th)
    inner = _ellipse_mask(X, Y, cx, cy, a_out - rim, b_out - rim, th)
    img = np.where(outer, rim_val[:, None, None], 0.0)
    img = np.where(inner, interior[:, None, None], img)
    # Inner ellipses: 3..8, centred inside the brain, varied size, angle and (signed) intensity.
    q = u[:, 9:].reshape(m, _P_INNER_MAX, 6)
    count = 3 + np.minimum(u[:, 8] * 6, 5).astype(int)  # 3..8
    active = np.arange(_P_INNER_MAX)[None, :] < count[:, None]
    r = np.sqrt(q[..., 0]) * 0.65  # uniform over a disc, 65 % of the brain's axes
    phi = 2 * math.pi * q[..., 1]
    ai, bi = (a_out - rim)[:, None], (b_out - rim)[:, None]
    lx, ly = r * np.cos(phi) * ai, r * np.sin(phi) * bi
    c, s = np.cos(th)[:, None], np.sin(th)[:, None]
    ecx, ecy = cx[:, None] + c * lx - s * ly, cy[:, None] + s * lx + c * ly
    ea = np.maximum(lerp(q[..., 2], 0.06, 0.40) * ai, 1.2 * px)
    eb = np.maximum(lerp(q[..., 3], 0.06, 0.40) * bi, 1.2 * px)
    eth = q[..., 4] * math.pi
    # intensity: about a quarter darker than the interior, the rest brighter
    val = np.where(q[..., 5] < 0.25, lerp(q[..., 5] / 0.25, -0.25, -0.05), lerp((q[..., 5] - 0.25) / 0.75, 0.05, 0.55))
    val = np.where(active, val, 0.0)
    masks = _ellipse_mask(X, Y, ecx, ecy, ea, eb, eth)  # [m, E, n, n]
    img = img + inner * np.einsum("me,mehw->mhw", val, masks.astype(np.float64))
    return np.clip(img, 0.0, 1.0).astype(np.float32)[:, None]


def _phantom_chunks(num: int, n: int, seed: int, chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    done = 0
    while done < num:
        m = min(chunk, num - done)
        yield _phantom_chunk(rng.random((m, _P_FIELDS)), n)
        done += m


def phantoms(num: int, n: int, seed: int) -> np.ndarray:
    """Random Shepp-Logan-like phantoms ``[num, 1, n, n]`` float32 in ``[0, 1]``.

    An outer ellipse (bright skull-like rim of 0.8-1.0, softer interior 0.1-0.35) holding
    3-8 random inner ellipses of varied size, angle and intensity (about a quarter darker
    than the interior), clipped to ``[0, 1]``.
    """
    return np.concatenate(list(_phantom_chunks(num, n, seed)), axis=0)


# ----------------------------------------------------------------------------- generic entry
def generate(kind: str, num: int, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """``(data [num, C, n, n] float32, meta)`` for a built-in ``kind``."""
    return _collect(kind, num, n, seed)


def _generate_chunks(kind: str, num: int, n: int, seed: int, chunk: int) -> tuple[Iterator[np.ndarray], dict]:
    if kind == "phantom":
        return _phantom_chunks(num, n, seed, chunk), {"value_range": [0.0, 1.0]}
    if kind in PDE_KINDS:
        return _pde_chunks(kind, num, n, seed, chunk)
    raise ValueError(f"unknown data kind {kind!r}; use one of {KINDS}")


def _collect(kind: str, num: int, n: int, seed: int) -> tuple[np.ndarray, dict]:
    chunks, meta = _generate_chunks(kind, num, n, seed, _CHUNK)
    data = np.concatenate(list(chunks), axis=0)
    return data, _meta(kind, num, n, seed, meta)


def _meta(kind: str, num: int, n: int, seed: int, extra: dict) -> dict:
    channels = ["intensity"] if kind == "phantom" else ["a", "u"]
    return {"kind": kind, "n": n, "seed": seed, "count": num, "channels": channels,
            "grid": {"n": n, "h": 1.0 / (n - 1), "domain": [0, 1]}, **extra}


def write_shards(kind: str, num: int, n: int, seed: int, out_dir: str | Path, shard_size: int = 1000) -> Path:
    """Write ``{kind}-{n}-{i:04d}.npy`` shards (``[m, C, n, n]`` float32) and ``meta.json`` into ``out_dir``.

    The shards concatenated equal ``generate(kind, num, n, seed)[0]``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks, extra = _generate_chunks(kind, num, n, seed, shard_size)
    shards = []
    for i, chunk in enumerate(chunks):
        name = f"{kind}-{n}-{i:04d}.npy"
        np.save(out / name, chunk)
        shards.append(name)
    meta = _meta(kind, num, n, seed, extra)
    meta["shards"] = shards
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- loading
_IMAGE_EXT = (".png", ".tif", ".tiff")


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    return arr.astype(np.float32)


def _image_to_chw(arr: np.ndarray) -> np.ndarray:
    arr = _to_float(np.asarray(arr))
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        # channels last (H, W, C) for PNG and most TIFFs; channels first if the first axis is small
        if arr.shape[-1] <= 4 and arr.shape[0] > 4:
            return np.moveaxis(arr, -1, 0)
        return arr
    raise ValueError(f"cannot read an image of shape {arr.shape}")


def load_file(path: str | Path) -> np.ndarray:
    """One file as ``[N, C, H, W]`` float32: ``.npy`` (``[H,W]``, ``[C,H,W]`` or ``[N,C,H,W]``), ``.png``, ``.tif``.

    Integer images are scaled to ``[0, 1]`` (8-bit by 1/255, 16-bit by 1/65535); floats are kept as is.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".npy":
        arr = _to_float(np.load(path, allow_pickle=False))
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"{path}: expected [C,H,W] or [N,C,H,W], got {arr.shape}")
        return arr
    if ext == ".png":
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("P", "PA"):
                im = im.convert("RGB")
            if im.mode in ("LA", "RGBA"):  # alpha is not intensity: dropped (as the service's PNG codec does)
                im = im.convert(im.mode[:-1])
            arr = np.asarray(im)
            if im.mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            elif im.mode == "I":  # 32-bit integer PNG mode used by PIL for 16-bit files
                arr = arr.astype(np.uint16) if arr.max(initial=0) <= 65535 else arr.astype(np.float32)
        return _image_to_chw(arr)[None]
    if ext in (".tif", ".tiff"):
        import tifffile

        return _image_to_chw(tifffile.imread(path))[None]
    raise ValueError(f"unsupported file type {path}")


RESIZE_RULE = ("the centred square crop (side min(H, W)) of every image, resized to N x N with antialiased "
               "bilinear interpolation (torch interpolate, antialias=True)")


def center_crop_resize(arr: np.ndarray, n: int) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[N, C, n, n]``: the centred square crop, then an antialiased bilinear resize.

    Images already ``n x n`` are returned unchanged (bit for bit)."""
    if arr.ndim != 4:
        raise ValueError(f"expected [N, C, H, W], got {arr.shape}")
    h, w = arr.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[..., top:top + side, left:left + side]
    if side == n:
        return np.ascontiguousarray(arr, dtype=np.float32)
    import torch

    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    y = torch.nn.functional.interpolate(x, size=(n, n), mode="bilinear", align_corners=False, antialias=side > n)
    return y.numpy()


def folder_files(path: str | Path) -> list[Path]:
    """The data files of a folder (or the one file), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npy",) + _IMAGE_EXT)
    if not files:
        raise ValueError(f"no .npy/.png/.tif files in {path}")
    return files


def is_image_folder(path: str | Path) -> bool:
    """Whether every data file in ``path`` is an image (PNG/TIFF) rather than ``.npy``."""
    return all(p.suffix.lower() in _IMAGE_EXT for p in folder_files(path))


def load_folder(path: str | Path, resolution: int | None = None) -> np.ndarray:
    """Every ``.npy`` / ``.png`` / ``.tif`` file in ``path`` (sorted by name) as ``[num, C, H, W]`` float32.

    With ``resolution`` each file is brought to ``resolution x resolution`` first (see
    :data:`RESIZE_RULE`), so images of different sizes can share a folder; without it all files
    must have the same shape. Alpha channels of PNGs are dropped.
    """
    arrays = []
    for p in folder_files(path):
        a = load_file(p)
        arrays.append(center_crop_resize(a, resolution) if resolution else a)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        hint = "" if resolution else " (give a resolution to crop and resize them to one size)"
        raise ValueError(f"files in {path} have different shapes {sorted(shapes)}{hint}")
    return np.concatenate(arrays, axis=0)


def load_meta(path: str | Path) -> dict | None:
    p = Path(path)
    p = p / "meta.json" if p.is_dir() else p.parent / "meta.json"
    return json.loads(p.read_text()) if p.exists() else None


# ----------------------------------------------------------------------------- CLI
def run_data(args: argparse.Namespace) -> Path:
    """``reconserve data`` (arguments: :func:`models.cli_args.add_data_arguments`)."""
    out = Path(args.out) if args.out else Path("data") / f"{args.kind}-{args.resolution}"
    write_shards(args.kind, args.num, args.resolution, args.seed, out, args.shard_size)
    print(f"wrote {args.num} {args.kind} examples ({args.resolution}x{args.resolution}) to {out}")
    return out


if __name__ == "__main__":
    run_data(add_data_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
