"""Operator cases shared by the operator tests: one or more specs of every kind, built once."""
import numpy as np
import torch

from operators import build_operator

SHAPE = (2, 16, 12)  # non-square on purpose
_rng = np.random.default_rng(0)
ASYM = _rng.random((5, 5))
ASYM[2, 2] += 3.0  # well-conditioned, clearly asymmetric
ASYM /= ASYM.sum()
MASK_HW = (_rng.random((16, 12)) < 0.4).astype(float)
MASK_CHW = (_rng.random((2, 16, 12)) < 0.4).astype(float)
_pts = np.stack([_rng.integers(0, s, 40) for s in SHAPE], axis=1)
POINTS_DUP = np.concatenate([_pts, _pts[:5], _pts[:2]])  # 7 duplicates
POINTS_UNIQUE = np.unique(_pts, axis=0)
KMASK = (_rng.random((16, 12)) < 0.35).astype(float)
KMASK[0, 0] = 1
CS_MATRIX = _rng.standard_normal((60, int(np.prod(SHAPE)))) / np.sqrt(60)

CASES = {
    "identity": ({"kind": "identity"}, SHAPE),
    "inpainting-hw": ({"kind": "inpainting", "mask": MASK_HW}, SHAPE),
    "inpainting-chw": ({"kind": "inpainting", "mask": MASK_CHW.tolist()}, SHAPE),
    "sparse-dup": ({"kind": "sparse_points", "points": POINTS_DUP}, SHAPE),
    "sparse-unique": ({"kind": "sparse_points", "points": POINTS_UNIQUE.tolist()}, SHAPE),
    "blur-kernel-circular": ({"kind": "blur", "kernel": ASYM}, SHAPE),
    "blur-kernel-reflect": ({"kind": "blur", "kernel": ASYM, "boundary": "reflect"}, SHAPE),
    "blur-gauss-circular": ({"kind": "blur", "gaussian": {"sigma": 1.0, "size": 5}}, SHAPE),
    "blur-gauss-reflect": ({"kind": "blur", "gaussian": {"sigma": 1.0}, "boundary": "reflect"}, SHAPE),
    "blur-motion-circular": ({"kind": "blur", "motion": {"size": 5, "seed": 1}}, SHAPE),
    "blur-motion-reflect": ({"kind": "blur", "motion": {"size": 5, "seed": 1}, "boundary": "reflect"}, SHAPE),
    "sr2": ({"kind": "super_resolution", "factor": 2}, SHAPE),
    "sr4": ({"kind": "super_resolution", "factor": 4}, SHAPE),
    "cs-seed": ({"kind": "compressed_sensing", "m": 100, "seed": 3}, SHAPE),
    "cs-matrix": ({"kind": "compressed_sensing", "matrix": CS_MATRIX}, SHAPE),
    "mri-real": ({"kind": "mri", "mask": KMASK}, (1, 16, 12)),
    "mri-complex": ({"kind": "mri", "mask": KMASK}, (2, 16, 12)),
    "ct": ({"kind": "ct", "angles": 20}, (2, 16, 16)),  # square images only
    "ct-cells": ({"kind": "ct", "angles": [0, 10, 45, 90, 170.5], "detectors": 17}, (2, 16, 16)),
}
_ops: dict = {}



def op_for(name):
    if name not in _ops:
        spec, shape = CASES[name]
        _ops[name] = build_operator(spec, shape)
    return _ops[name]


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


