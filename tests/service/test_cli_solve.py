"""``reconserve solve``: the server's validation and driver locally (clear errors, exit code 2,
no traceback), and through a real server with progress from its event stream."""
import json

import numpy as np
import pytest
from PIL import Image

from guidance.solve import solve
from operators.spec import build_operator
from service.cli import main
from tests.helpers.server import start_server, stop_server
from tests.helpers.service import MODELS


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random((32, 32)) < 0.5
    np.save(tmp_path / "mask.npy", mask.astype(np.uint8))
    y8 = (rng.random((32, 32)) * 255).astype(np.uint8)
    Image.fromarray(y8).save(tmp_path / "y.png")
    (tmp_path / "op.json").write_text(json.dumps({"kind": "inpainting", "mask": "mask.npy"}))
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "inpainting", "mask": "mask.npy", "bogus": 1}))
    return tmp_path, mask, y8[None] / 255.0


def run(args) -> int:
    return main(["solve", "--model", "grf-32", *map(str, args)])


def test_local_solve_equals_the_library(files):
    d, mask, y = files
    assert run(["--operator", d / "op.json", "--observation", d / "y.png", "--method", "fast", "--steps", 6,
                "--samples", 2, "--seed", 4, "--out", d / "r.npz"]) == 0
    r = np.load(d / "r.npz")
    sol = solve(MODELS["grf-32"], build_operator({"kind": "inpainting", "mask": mask}, (1, 32, 32)),
                y * mask, method="fast", params={"steps": 6}, num_samples=2, seed=4)
    np.testing.assert_array_equal(r["samples"], sol.samples)
    assert json.loads(str(r["meta"]))["nfe"] == 6


def test_bad_input_is_a_message_not_a_traceback(files, capsys):
    d, _, _ = files
    assert run(["--operator", d / "bad.json", "--observation", d / "y.png", "--out", d / "r.npz"]) == 2
    err = capsys.readouterr().err
    assert "invalid_operator" in err and "bogus" in err and "Traceback" not in err
    assert main(["solve", "--model", "phantom-64", "--operator", str(d / "op.json"), "--observation",
                 str(d / "y.png"), "--out", str(d / "r.npz")]) == 2
    assert "at least 64 x 64" in capsys.readouterr().err  # the sizes phantom-64 takes
    assert run(["--operator", d / "missing.json", "--observation", d / "y.png", "--out", d / "r.npz"]) == 2


@pytest.mark.slow
def test_solve_through_a_server_shows_progress(files, capsys):
    d, _, _ = files
    proc, url = start_server()
    try:
        assert run(["--operator", d / "op.json", "--observation", d / "y.png", "--method", "dps", "--steps", 300,
                    "--server", url, "--out", d / "s.npz"]) == 0
    finally:
        stop_server(proc)
    assert "300/300" in capsys.readouterr().err
    assert np.load(d / "s.npz")["mean"].shape == (1, 32, 32)
