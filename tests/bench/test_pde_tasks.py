"""bench/pde_tasks.py: its smoke mode runs end to end (the trained poisson-64 where it is present,
else a tiny random-weight checkpoint built here), and its ground truth and classical routes are
exact where they must be: the exact solve from the exact ``a`` is the held-out ``u``, and the
discrete operator applied to the exact ``u`` gives back ``a``."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import pde_tasks
from bench.common import CHECKPOINTS
from models.checkpoint import CARD, build_network, save_checkpoint

N = 64
A_SCALE = 76742.78870865691  # the training set's factor (runs/poisson-64/data_meta.json); any value works


def tiny_checkpoint(folder: Path, kind: str = "poisson") -> Path:
    """A random-weight 2 x 64 x 64 Poisson/Helmholtz prior (the smallest U-Net) with a real card's pde block."""
    arch = {"name": "unet", "args": {"in_channels": 2, "out_channels": 2, "base": 8, "channel_mult": [1],
                                     "blocks_per_level": 1, "attention": False}}
    pde = {"kind": kind, "grid": {"n": N, "h": 1.0 / (N - 1), "domain": [0, 1]}, "bc": "u=0 on boundary nodes",
           "equation": "laplace(u) = a" if kind == "poisson" else "laplace(u) + k^2 u = a", "a_scale": A_SCALE}
    if kind == "helmholtz":
        pde["k"] = 1.0
    card = {"id": folder.name, "kind": "pde", "shape": [2, N, N], "channels": ["a", "u"], "architecture": arch,
            "parameterization": {"kind": "edm", "sigma_data": 0.5}, "sigma_min": 0.002, "sigma_max": 80.0,
            "normalization": {"shift": [0.0, 0.0], "scale": [2.0, 0.032]}, "pde": pde,
            "training": {"steps": 0, "data_seed": 0}}
    torch.manual_seed(0)
    return save_checkpoint(folder, build_network(arch), card)


@pytest.fixture(scope="module")
def poisson_checkpoint(tmp_path_factory) -> Path:
    real = CHECKPOINTS / "poisson-64"
    if (real / CARD).is_file() and (real / "weights.safetensors").is_file():
        return real
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "poisson-tiny")


@pytest.mark.slow  # a bench's smoke run end to end: 20 s on a busy 2-core machine
def test_smoke_runs_and_gives_finite_numbers(poisson_checkpoint, tmp_path):
    out = tmp_path / "tasks.json"
    data = pde_tasks.main(["--model", str(poisson_checkpoint), "--smoke", "--threads", "1", "--quiet",
                           "--out", str(out)])
    assert data["cases"] == 2 and data["smoke"] and data["ground_truth_pde_res"] < 1e-10
    saved = json.loads(out.read_text())
    assert set(saved["tasks"]) == {"forward", "inverse"}
    for task, d in saved["tasks"].items():
        assert set(d["methods"]) == set(pde_tasks.DEFAULT_METHODS.split(","))
        for label, e in d["methods"].items():
            assert not e["diverged"], (task, label)
            for k in pde_tasks.METRIC_KEYS:
                assert len(e[k]) == 2 and all(math.isfinite(v) for v in e[k]), (task, label, k, e[k])
            if label != "classical":
                assert e["nfe"] == {"diffusion_pde": 5, "dps": 6}.get(e["method"], 3), (label, e["nfe"])
        # forward: samples are completed by the exact solve, so the returned pair has no residual
        fwd = saved["tasks"]["forward"]["methods"]
        assert fwd["fast"]["completed"] and max(fwd["fast"]["pde_res"]) < 1e-9
        assert fwd["fast"]["u_rel"] == pytest.approx(fwd["fast"]["u_solve_rel"], rel=1e-9)


def test_card_validation_written(tmp_path):
    folder = tiny_checkpoint(tmp_path / "helmholtz-tiny", "helmholtz")
    out = tmp_path / "tasks.json"
    pde_tasks.main(["--model", str(folder), "--smoke", "--threads", "1", "--quiet", "--out", str(out),
                    "--methods", "fast,classical", "--update-card"])
    card = json.loads((folder / CARD).read_text())
    v = card["validation"]
    assert v["benchmark"] == "bench/pde_tasks.py" and v["cases"] == 2 and v["observed_nodes"] == 500
    assert v["tasks"]["forward"]["headline"] == "u_rel" and v["tasks"]["inverse"]["headline"] == "a_rel"
    assert set(v["tasks"]["inverse"]["methods"]) == {"fast", "classical"}
    assert card["pde"]["kind"] == "helmholtz" and card["architecture"]["args"]["base"] == 8  # the rest kept


@pytest.mark.parametrize("kind", ["poisson", "helmholtz"])
def test_truth_and_classical_routes_are_exact_with_every_node(kind, tmp_path):
    model, _ = pde_tasks.resolve_model(str(tiny_checkpoint(tmp_path / f"{kind}-tiny", kind)))
    pde = pde_tasks.model_pde(model)
    x = pde_tasks.held_out(model, 1)
    a, u = x[:, 0], x[:, 1]
    # the training scale: a = g * a_scale, the GRF's std is about 1/a_scale, so a's is about 1
    assert 0.3 < a.std() < 3.0 and np.allclose(a.mean(axis=(1, 2)), 0, atol=1e-12)
    # the held-out u is the exact discrete solution: residual at round-off
    assert float(pde.relative_residual(torch.as_tensor(x)).max()) < 1e-10
    # the discrete operator applied to the exact u gives the exact a (interior nodes)
    a_rec = pde_tasks.source_of(u[0], pde)
    err = np.abs(a_rec[1:-1, 1:-1] - a[0, 1:-1, 1:-1]).max() / np.abs(a[0]).max()
    assert err < 1e-10, err
    # classical routes with every node observed: forward reproduces u to solver precision,
    # inverse reproduces a (interior) from the exact u
    rows, cols = (g.ravel() for g in np.meshgrid(np.arange(N), np.arange(N), indexing="ij"))
    fwd, _ = pde_tasks.classical_baseline("forward", torch.as_tensor(a[:, rows, cols]), rows, cols, pde)
    inv, _ = pde_tasks.classical_baseline("inverse", torch.as_tensor(u[:, rows, cols]), rows, cols, pde)
    m_fwd = pde_tasks.metrics(fwd, x, pde)
    m_inv = pde_tasks.metrics(inv, x, pde)
    assert max(m_fwd["u_rel"]) < 1e-10 and max(m_fwd["a_rel"]) < 1e-12 and max(m_fwd["pde_res"]) < 1e-10
    assert max(m_inv["a_rel_int"]) < 1e-10 and max(m_inv["u_rel"]) < 1e-12 and max(m_inv["u_solve_rel"]) < 1e-10
    # ... and with the 500 observed nodes they are not exact (the task is not trivial)
    _, op, y, r5, c5 = pde_tasks.task_problem("forward", x, shape=(2, N, N))
    sparse, _ = pde_tasks.classical_baseline("forward", y, r5, c5, pde)
    assert min(pde_tasks.metrics(sparse, x, pde)["u_rel"]) > 1e-3


def test_tune_smoke_picks_a_best_per_task_and_method(tmp_path):
    """--tune (the loop shared with darcy_tasks.py, ``bench.common.tune_pde_tasks``): every task and
    method gets its grid's records and a chosen value from that grid, written to --tune-out."""
    folder = tiny_checkpoint(tmp_path / "poisson-tiny")
    tune_out = tmp_path / "tune.json"
    grid = {"forward": {"dps": {"zeta": [0.3, 1.0]}}, "inverse": {"dps": {"zeta": [30.0, 100.0]}}}
    out = pde_tasks.main(["--model", str(folder), "--tune", "--smoke", "--threads", "1", "--tune-methods",
                          "dps,fast", "--grid", json.dumps(grid), "--tune-out", str(tune_out)])
    saved = json.loads(tune_out.read_text())
    assert saved["best"] == out["best"] and saved["cases"] == 2
    for task in ("forward", "inverse"):
        # --smoke keeps one value per parameter: the first of the --grid override
        assert [r["zeta"] for r in saved["results"][task]["dps"]] == grid[task]["dps"]["zeta"][:1]
        for name, records in saved["results"][task].items():
            # a method is chosen exactly when one of its runs scored (random weights may blow u up)
            scored = [r for r in records if r.get("u_rel_mean") is not None and r["u_rel_mean"] < 1]
            assert (name in saved["best"][task]) == bool(scored), (task, name, records)
        assert saved["best"][task]  # something scored on each task (seeded: fast does)


def test_darcy_tune_and_run_share_the_loops(tmp_path):
    """darcy_tasks.py runs through the same loops: a tiny tune and a tiny run on darcy-64 write their files."""
    from bench import darcy_tasks
    if not (CHECKPOINTS / "darcy-64" / CARD).is_file():
        pytest.skip("darcy-64 is not in checkpoints/")
    tune_out, out = tmp_path / "tune.json", tmp_path / "run.json"
    darcy_tasks.main(["--tune", "--tune-cases", "1", "--steps", "2", "--dps-steps", "2", "--threads", "1",
                      "--tune-methods", "dps", "--grid", '{"forward": {"dps": {"zeta": [0.3]}}, '
                      '"inverse": {"dps": {"zeta": [300.0]}}}', "--tune-out", str(tune_out)])
    best = json.loads(tune_out.read_text())["best"]
    assert best == {"forward": {"dps": {"zeta": 0.3}}, "inverse": {"dps": {"zeta": 300.0}}}
    darcy_tasks.main(["--cases", "1", "--steps", "2", "--dps-steps", "2", "--threads", "1", "--quiet",
                      "--methods", "dps,classical", "--tuned", str(tune_out), "--out", str(out)])
    saved = json.loads(out.read_text())
    for task in ("forward", "inverse"):
        m = saved["tasks"][task]["methods"]
        assert set(m) == {"dps", "classical"} and m["dps"]["nfe"] == 2
        assert m["dps"]["params"]["zeta"] == best[task]["dps"]["zeta"]  # the tuned value was used


def test_the_task_benches_share_one_copy_of_the_loops():
    from bench import common, darcy_tasks, phantom_tasks
    for mod in (darcy_tasks, pde_tasks):
        assert mod.pde_tasks_on is common.pde_tasks_on and mod.run_pde_tasks is common.run_pde_tasks
        assert mod.tune_pde_tasks is common.tune_pde_tasks and not hasattr(mod, "method_params")
    assert phantom_tasks.tune_method is common.tune_method
