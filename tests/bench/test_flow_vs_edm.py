"""bench/flow_vs_edm.py takes each budget's checkpoints from the commits it names, with the step counts
it claims (the EDM and flow priors at equal training steps), and its table pairs the cases."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import flow_vs_edm
from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _have(rev: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.parametrize("steps", sorted(flow_vs_edm.AT))
def test_each_budget_checks_out_both_priors_at_that_step_count(steps, tmp_path):
    kinds = {}
    for model, rev in flow_vs_edm.AT[steps].items():
        if not _have(rev):
            pytest.skip(f"{rev} is not in this clone's history (shallow?)")
        folder = flow_vs_edm.checkout(model, rev, steps, tmp_path)
        card = json.loads((folder / "card.json").read_text())
        assert card["id"] == model and card["training"]["batch"] == 16
        kinds[model] = card["parameterization"]["kind"]
        load_checkpoint(folder)  # the weights load into the card's network
    assert kinds == {flow_vs_edm.EDM: "edm", flow_vs_edm.FLOW: "flow"}


def test_a_wrong_step_count_is_refused(tmp_path):
    model, rev = next(iter(flow_vs_edm.AT[1948].items()))
    if not _have(rev):
        pytest.skip(f"{rev} is not in this clone's history")
    with pytest.raises(SystemExit, match="training steps"):
        flow_vs_edm.checkout(model, rev, 1949, tmp_path)
