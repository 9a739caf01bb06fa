"""bench/common.py's helpers of the service benches (http_overhead, batching_throughput,
ray_throughput, load_test): defined once there, imported by each bench."""
import hashlib
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import common


def test_the_service_benches_share_one_copy_of_each_helper():
    from bench import batching_throughput, http_overhead, load_test, ray_throughput

    assert http_overhead.Server is batching_throughput.Server is ray_throughput.Server is common.Server
    assert (http_overhead.snapshot_checkpoints is batching_throughput.snapshot_checkpoints
            is ray_throughput.snapshot_checkpoints is common.snapshot_checkpoints)  # bench/peers.py imports it so
    assert batching_throughput.make_jobs is ray_throughput.make_jobs is common.make_jobs
    assert batching_throughput.run_concurrent is ray_throughput.run_concurrent is common.run_concurrent
    assert load_test.free_port is common.free_port
    for mod in (http_overhead, batching_throughput, ray_throughput):
        assert not hasattr(mod, "write_json") and mod.environment is common.environment


def test_free_port_can_be_bound():
    port = common.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_environment_load_average_only_when_asked():
    assert "loadavg_1m" not in common.environment(1)
    env = common.environment(3, loadavg=True)
    assert env["threads"] == 3 and env["loadavg_1m"] >= 0


def test_snapshot_checkpoints_copies_card_and_weights(tmp_path):
    ids = [p.name for p in sorted(common.CHECKPOINTS.iterdir()) if (p / common.WEIGHTS).exists()][:1]
    if not ids:
        pytest.skip("no trained checkpoint in checkpoints/")
    out = common.snapshot_checkpoints(ids + ["grf-32"], tmp_path)
    assert list(out) == ids  # the built-in grf-32 has no folder: skipped
    mid = ids[0]
    data = (tmp_path / mid / common.WEIGHTS).read_bytes()
    assert out[mid] == hashlib.sha256(data).hexdigest()[:16] == common.weights_digest(mid, tmp_path / mid)
    assert (tmp_path / mid / common.CARD).read_text() == (common.CHECKPOINTS / mid / common.CARD).read_text()


def test_make_jobs_are_seeded_inpainting_cases():
    jobs = common.make_jobs("grf-32", 4)
    again = common.make_jobs("grf-32", 4)
    assert [j["seed"] for j in jobs] == [100, 101, 102, 103]
    for j, k in zip(jobs, again):
        assert np.array_equal(j["x"], k["x"]) and np.array_equal(j["mask"], k["mask"])
        assert j["x"].shape == (1, 32, 32) and j["mask"].shape == (32, 32)
        assert np.array_equal(j["y"], (j["x"] * j["mask"]).astype(np.float32))
    dens = [j["mask"].mean() for j in jobs]
    assert 0.1 < dens[0] < 0.3 and 0.4 < dens[-1] < 0.6  # 20 % .. 50 % observed
    with pytest.raises(SystemExit):
        common.make_jobs("darcy-64", 2)
