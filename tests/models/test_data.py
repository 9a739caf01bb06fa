"""Data generators follow DESIGN.md's data conventions; folders of user data load with the right scaling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models import data as D


def test_grf_seeded_and_zero_mean():
    g1 = D.grf_coefficient(16, np.random.default_rng(3), num=4)
    g2 = D.grf_coefficient(16, np.random.default_rng(3), num=4)
    g3 = D.grf_coefficient(16, np.random.default_rng(4), num=4)
    assert g1.shape == (4, 16, 16) and g1.dtype == np.float64
    assert np.array_equal(g1, g2) and not np.allclose(g1, g3)
    assert np.abs(g1.mean(axis=(1, 2))).max() < 1e-12 * np.abs(g1).max()  # k = 0 mode is zero
    # one sample at a time draws the same stream as a batch
    rng = np.random.default_rng(3)
    assert np.array_equal(np.stack([D.grf_coefficient(16, rng) for _ in range(4)]), g1)


def test_grf_spectrum_decays_as_specified():
    n, alpha, tau = 32, 2.0, 3.0
    g = D.grf_coefficient(n, np.random.default_rng(0), alpha, tau, num=400)
    power = np.abs(np.fft.fft2(g)) ** 2
    k = np.fft.fftfreq(n, 1 / n)
    kk = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    p1, p4 = power[:, kk == 1].mean(), power[:, kk == 4].mean()
    theory = ((4 * math.pi ** 2 * 16 + tau ** 2) / (4 * math.pi ** 2 + tau ** 2)) ** alpha
    assert abs(p1 / p4 / theory - 1) < 0.3
    assert power[:, 0, 0].max() < 1e-20 * p1


def test_darcy_pairs_conventions():
    from operators.pde import DarcyResidual

    d = D.darcy_pairs(6, 32, seed=1, dtype=np.float64)
    assert d.shape == (6, 2, 32, 32)
    a, u = d[:, 0], d[:, 1]
    assert set(np.unique(a)) == {3.0, 12.0}
    assert 0.3 < (a == 12).mean() < 0.7
    for edge in (u[:, 0, :], u[:, -1, :], u[:, :, 0], u[:, :, -1]):
        assert np.all(edge == 0)
    assert u[:, 1:-1, 1:-1].min() > 0  # -div(a grad u) = 1 > 0 with u = 0 on the boundary
    res = DarcyResidual((2, 32, 32)).relative_residual(torch.from_numpy(d))
    assert float(res.max()) < 1e-8
    # the float32 default is the same data rounded; seeds reproduce and differ
    d32 = D.darcy_pairs(6, 32, seed=1)
    assert d32.dtype == np.float32 and np.array_equal(d32, d.astype(np.float32))
    assert np.array_equal(D.darcy_pairs(2, 16, seed=5), D.darcy_pairs(2, 16, seed=5))
    assert not np.array_equal(D.darcy_pairs(2, 16, seed=5), D.darcy_pairs(2, 16, seed=6))


@pytest.mark.parametrize("kind", ["poisson", "helmholtz"])
def test_poisson_helmholtz_pairs(kind):
    from operators import pde

    fn = D.poisson_pairs if kind == "poisson" else D.helmholtz_pairs
    d, meta = fn(8, 24, seed=2, return_meta=True, dtype=np.float64)
    a = d[:, 0]
    assert abs(a.std() - 1) < 1e-12 and abs(a.mean()) < 1e-12  # unit std over the set, zero mean
    g = D.grf_coefficient(24, np.random.default_rng(2), num=8)
    assert np.allclose(a, g * meta["a_scale"], rtol=1e-12, atol=0)
    res_cls = pde.PoissonResidual if kind == "poisson" else pde.HelmholtzResidual
    assert float(res_cls((2, 24, 24)).relative_residual(torch.from_numpy(d)).max()) < 1e-8
    assert np.all(d[:, 1, 0, :] == 0) and np.all(d[:, 1, :, -1] == 0)


def test_phantoms():
    p = D.phantoms(40, 64, seed=0)
    assert p.shape == (40, 1, 64, 64) and p.dtype == np.float32
    assert p.min() >= 0 and p.max() <= 1
    assert np.all(p.std(axis=(1, 2, 3)) > 0.05)
    assert np.array_equal(p, D.phantoms(40, 64, seed=0))
    assert not np.array_equal(p[:5], D.phantoms(5, 64, seed=1))
    for img in p[:, 0]:
        # background outside the head, a bright rim where the head starts, a softer interior
        assert np.all(img[0] == 0) and np.all(img[-1] == 0) and np.all(img[:, 0] == 0) and np.all(img[:, -1] == 0)
        row = img[32]
        first, last = np.argmax(row > 0.01), len(row) - 1 - np.argmax(row[::-1] > 0.01)
        assert row[first] >= 0.8 and row[last] >= 0.8
        assert np.median(img[img > 0.01]) < 0.7
    # several inner structures: more distinct grey levels than rim + interior + background
    assert np.mean([len(np.unique(img)) for img in p[:, 0]]) > 5


def test_generate_chunking_and_shards(tmp_path):
    d, meta = D.generate("phantom", 5, 16, seed=7)
    out = D.write_shards("phantom", 5, 16, 7, tmp_path / "ph", shard_size=2)
    files = sorted(p.name for p in out.glob("*.npy"))
    assert files == ["phantom-16-0000.npy", "phantom-16-0001.npy", "phantom-16-0002.npy"]
    m = json.loads((out / "meta.json").read_text())
    assert (m["kind"], m["n"], m["seed"], m["count"]) == ("phantom", 16, 7, 5)
    assert np.array_equal(D.load_folder(out), d)  # shards concatenated = one-shot generation
    out = D.write_shards("poisson", 5, 12, 1, tmp_path / "po", shard_size=2)
    m = json.loads((out / "meta.json").read_text())
    ref, ref_meta = D.poisson_pairs(5, 12, 1, return_meta=True)
    assert m["a_scale"] == ref_meta["a_scale"]
    assert np.array_equal(D.load_folder(out), ref)


def test_load_folder_formats(tmp_path):
    from PIL import Image
    import tifffile

    rng = np.random.default_rng(0)
    # .npy, single [C,H,W] and stacked [N,C,H,W]
    f = tmp_path / "npy"
    f.mkdir()
    a, b = rng.standard_normal((2, 8, 8)), rng.standard_normal((3, 2, 8, 8))
    np.save(f / "a.npy", a.astype(np.float32))
    np.save(f / "b.npy", b.astype(np.float64))
    x = D.load_folder(f)
    assert x.shape == (4, 2, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[0], a) and np.allclose(x[1:], b)
    # PNG, 8-bit and 16-bit
    f = tmp_path / "png"
    f.mkdir()
    i8 = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    i16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(i8).save(f / "a.png")
    Image.fromarray(i16).save(f / "b.png")
    x = D.load_folder(f)
    assert x.shape == (2, 1, 8, 8)
    assert np.allclose(x[0, 0], i8 / 255.0) and np.allclose(x[1, 0], i16 / 65535.0)
    # TIFF, 16-bit and float
    f = tmp_path / "tif"
    f.mkdir()
    fl = rng.standard_normal((8, 8)).astype(np.float32) * 5
    tifffile.imwrite(f / "a.tif", i16)
    tifffile.imwrite(f / "b.tif", fl)
    x = D.load_folder(f)
    assert np.allclose(x[0, 0], i16 / 65535.0) and np.array_equal(x[1, 0], fl)
    # RGB PNG becomes 3 channels
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x = D.load_folder(tmp_path / "rgb.png")
    assert x.shape == (1, 3, 8, 8) and np.allclose(x[0], np.moveaxis(rgb, -1, 0) / 255.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        D.load_folder(tmp_path / "empty")


def test_center_crop_resize_and_alpha(tmp_path):
    from PIL import Image

    # the centred square: a 4 x 8 image keeps columns 2..5
    x = np.arange(32, dtype=np.float32).reshape(1, 1, 4, 8)
    assert np.array_equal(D.center_crop_resize(x, 4), x[..., 2:6])
    # downsizing a constant image keeps it constant (antialiased bilinear), a smooth ramp stays a ramp
    big = np.full((2, 3, 128, 96), 0.25, np.float32)
    small = D.center_crop_resize(big, 32)
    assert small.shape == (2, 3, 32, 32) and np.allclose(small, 0.25)
    ramp = np.broadcast_to(np.linspace(0, 1, 128, dtype=np.float32), (1, 1, 128, 128))
    r = D.center_crop_resize(ramp, 32)[0, 0, 0]
    assert np.all(np.diff(r) > 0) and abs(r.mean() - 0.5) < 1e-3
    # a folder of mixed sizes loads at one resolution; alpha channels are dropped
    f = tmp_path / "mixed"
    f.mkdir()
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(f / "a.png")  # RGBA
    Image.fromarray(np.full((48, 80, 3), 255, np.uint8)).save(f / "b.png")
    with pytest.raises(ValueError, match="resolution"):
        D.load_folder(f)
    x = D.load_folder(f, resolution=16)
    assert x.shape == (2, 3, 16, 16) and np.allclose(x[0], 0) and np.allclose(x[1], 1)
    assert D.is_image_folder(f) and D.is_image_folder(f / "a.png")
