"""bench/volume_ct.py: its smoke mode runs end to end, and its phantom and re-slices are what it says."""
import json

import numpy as np
import pytest

from bench import volume_ct


def test_phantom_volume_is_a_head_of_ellipsoids():
    v = volume_ct.phantom_volume(16)
    assert v.shape == (16, 1, 64, 64) and v.dtype == np.float32
    assert v.min() >= 0 and v.max() <= 1
    mid = v[8, 0]
    assert mid[32, 32] > 0 and mid[0, 0] == 0 and mid.max() >= 0.8  # inside, outside, the bright rim
    assert np.abs(np.diff(v[:, 0], axis=0)).sum() > 0  # it varies along z


def test_reslices_are_the_central_half_along_each_axis():
    v = np.arange(4 * 8 * 8, dtype=np.float64).reshape(4, 1, 8, 8)
    sag, cor = volume_ct.reslices(v, 3), volume_ct.reslices(v, 2)
    assert sag.shape == cor.shape == (4, 4, 8)
    np.testing.assert_array_equal(sag[0], v[:, 0, :, 2])  # x = 2: the first of the central half
    np.testing.assert_array_equal(cor[0], v[:, 0, 2, :])


@pytest.mark.slow
def test_smoke(capsys):
    volume_ct.main(["--smoke"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(rows) == {"8_angles", "16_angles"}
    for r in rows.values():
        assert set(r) == {"fbp", "independent", "tv_z"}
        assert all(np.isfinite(v) for m in r.values() for v in m.values())
