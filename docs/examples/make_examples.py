"""Write the small example files the README quickstart uses; deterministic.

    .venv/bin/python docs/examples/make_examples.py

Ground truths are held out: drawn with seed ``SEED`` (the embedded models were trained on
seed 0; ``models.data`` draws every example from ``numpy.random.default_rng(seed)``).

* ``phantom-truth.npy``: a phantom ``[1, 64, 64]`` float32 in [0, 1];
* ``phantom-request.json``: a complete ``POST /v1/reconstruct`` body: 4x super-resolution of
  that phantom (observation ``[1, 16, 16]``, the mean over each 4 x 4 block, as base64 ``.npy``),
  ``fast`` 30 steps, 4 posterior samples (so the result has a std map);
* ``phantom-mask.npy``: an inpainting mask ``[64, 64]`` bool, 1 = observed (30 %);
* ``phantom-inpainting.json``: an operator JSON for ``reconserve solve`` that names the mask file;
* ``phantom-inpainting-obs.png``: the masked phantom as an 8-bit grayscale PNG (``/255`` on reading);
* ``darcy-truth.npy``: a Darcy pair ``[2, 64, 64]`` float32, channels ``(a, u)``, ``a`` in {3, 12},
  ``u`` the exact discrete solution of ``-div(a grad u) = 1`` (``u`` of order 1e-2);
* ``darcy-forward-request.json``: the forward problem: ``a`` at the same 500 nodes, the card's
  default method, 4 samples; ``u`` comes back solved from each sample's ``a`` (``completion``).
* ``phantom-volume.nii``: a noisy volume of 8 slices of 64 x 64 in Hounsfield-like units (a 3-D
  phantom of ellipsoids, ``-1000 + 2000 x`` for ``x`` in [0, 1], noise 100), a NIfTI-1 file with
  0.8 mm pixels and 2 mm slices; ``phantom-volume-truth.npy``: the clean volume ``[8, 64, 64]``
  in the same units (README "Your lab's data");
* ``darcy-inverse-request.json``: a ``POST /v1/reconstruct`` body for the inverse problem: ``u``
  observed at 500 random nodes (``sparse_points``, points and values as plain JSON lists),
  the card's default method (``dps``, 200 steps), ``completion: "solve"`` (``u`` solved from the
  recovered ``a``).
"""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.data import darcy_pairs, phantoms  # noqa: E402

SEED = 1000003  # held out: training used seed 0
N = 64
SR_FACTOR = 4
MASK_DENSITY = 0.3
N_NODES = 500


def b64_npy(a: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return {"npy": base64.b64encode(buf.getvalue()).decode("ascii")}


def dump_request(path: Path, body: dict) -> None:
    """One top-level key a line, arrays compact (readable, small)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in body.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


#: The volume example: slices, Hounsfield-like units of x = 0 and 1, noise (in those units).
VOLUME_DEPTH, HU, HU_NOISE = 8, (-1000.0, 1000.0), 100.0


def ellipsoid_volume(d: int, n: int) -> np.ndarray:
    """``[d, n, n]`` in [0, 1]: a head-like ellipsoid with two inner ellipsoids, smooth along z."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    vol = np.zeros((d, n, n))
    for (cz, cy, cx), (rz, ry, rx), value in (((0, 0, 0), (1.6, 0.85, 0.7), 0.5),
                                               ((0.3, -0.2, -0.25), (0.9, 0.25, 0.18), 0.4),
                                               ((-0.2, 0.3, 0.2), (1.2, 0.2, 0.3), 0.3)):
        vol += value * (((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1)
    return np.clip(vol, 0, 1)


def write_volume() -> None:
    import nibabel as nib

    lo, hi = HU
    truth = (lo + (hi - lo) * ellipsoid_volume(VOLUME_DEPTH, N)).astype(np.float32)  # [D, H, W]
    noisy = truth + HU_NOISE * np.random.default_rng(SEED + 3).standard_normal(truth.shape).astype(np.float32)
    np.save(HERE / "phantom-volume-truth.npy", truth)
    # NIfTI axes x, y, z are W, H, D: data[x, y, z] = volume[z, y, x]
    img = nib.Nifti1Image(noisy.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, HERE / "phantom-volume.nii")


def main() -> int:
    from PIL import Image

    # ---- phantom-64
    x = phantoms(1, N, SEED)[0].astype(np.float32)  # [1, 64, 64]
    np.save(HERE / "phantom-truth.npy", x)
    f = SR_FACTOR
    y_sr = x.reshape(1, N // f, f, N // f, f).mean(axis=(2, 4)).astype(np.float32)  # [1, 16, 16]
    dump_request(HERE / "phantom-request.json", {
        "model": "phantom-64",
        "operator": {"kind": "super_resolution", "factor": f},
        "observation": b64_npy(y_sr),
        "noise_sigma": 0.0,
        "method": {"name": "fast", "steps": 30},
        "num_samples": 4,
        "seed": 0,
        "return": ["mean", "std"],
    })
    mask = np.random.default_rng(SEED + 1).random((N, N)) < MASK_DENSITY
    np.save(HERE / "phantom-mask.npy", mask)
    (HERE / "phantom-inpainting.json").write_text(
        json.dumps({"kind": "inpainting", "mask": "phantom-mask.npy"}) + "\n")
    obs = np.round(x[0] * mask * 255).astype(np.uint8)
    Image.fromarray(obs, mode="L").save(HERE / "phantom-inpainting-obs.png")

    write_volume()

    # ---- darcy-64
    pair = darcy_pairs(1, N, SEED, dtype=np.float64)[0]  # [2, 64, 64]: a, u
    np.save(HERE / "darcy-truth.npy", pair.astype(np.float32))
    rng = np.random.default_rng(SEED + 2)
    nodes = np.sort(rng.choice(N * N, N_NODES, replace=False))
    points = np.stack([np.ones(N_NODES, dtype=int), nodes // N, nodes % N], axis=1)  # (channel u, row, col)
    u_obs = pair[1][points[:, 1], points[:, 2]]
    dump_request(HERE / "darcy-inverse-request.json", {
        "model": "darcy-64",
        "operator": {"kind": "sparse_points", "points": points.tolist()},
        "observation": [float(f"{v:.7g}") for v in u_obs],
        "noise_sigma": 0.0,
        "completion": "solve",
        "num_samples": 1,
        "seed": 0,
        "return": ["mean"],
    })
    a_points = points.copy()
    a_points[:, 0] = 0  # channel a
    dump_request(HERE / "darcy-forward-request.json", {
        "model": "darcy-64",
        "operator": {"kind": "sparse_points", "points": a_points.tolist()},
        "observation": [float(v) for v in pair[0][points[:, 1], points[:, 2]]],
        "num_samples": 4,
        "seed": 0,
        "return": ["mean", "std"],
    })
    for p in sorted(HERE.iterdir()):
        if p.name != Path(__file__).name:
            print(f"{p.relative_to(ROOT)}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
