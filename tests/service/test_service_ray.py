"""Scale-out on Ray Serve against a real local Ray cluster (``reconserve serve --ray --ray-cpus 2``,
two CPU worker replicas) with the job store on a real PostgreSQL server: the HTTP contract
(submit, SSE, result, synchronous reconstruct, cancel, 429), jobs spread over both replicas, and
a replica killed (``kill -9``) while it runs jobs loses nothing: every accepted job succeeds with
the samples an uninterrupted run gives (grf-32 is float64: bit for bit)."""
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest

from tests.helpers.postgres import fresh_database
from tests.helpers.server import LONG, done, server_log, solo, start_server, stop_server, submit, wait_for
from tests.helpers.service import body, decode

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow  # a Ray cluster, PostgreSQL, a server process


@pytest.fixture(scope="module")
def cluster(pg_url):
    env = {"RECONSERVE_DATABASE_URL": fresh_database(pg_url, "reconserve_ray"),
           "RECONSERVE_RAY_MIN_WORKERS": 2, "RECONSERVE_RAY_MAX_WORKERS": 2,
           # two jobs held per replica (batched when compatible), three waiting in the store
           "RECONSERVE_RAY_JOBS_PER_WORKER": 2, "RECONSERVE_QUEUE_SIZE": 3,
           "RECONSERVE_LEASE_S": 3, "RECONSERVE_PROGRESS_PERSIST_S": 0.2}
    proc, url = start_server(env, ready_timeout=300, serve_args=("--ray", "--ray-cpus", "2"))
    try:
        end = time.monotonic() + 300  # /readyz: one worker answered; the log line: every replica runs
        while "reconserve on Ray Serve at" not in server_log(proc):
            assert time.monotonic() < end and proc.poll() is None, server_log(proc)[-3000:]
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http
    finally:
        stop_server(proc, timeout=60)


def drain(http, ids):
    return {j: wait_for(http, j, done, timeout=240) for j in ids}


def test_jobs_spread_over_both_replicas_with_exact_results(cluster):
    http = cluster
    ids = {seed: submit(http, seed=seed, method=LONG) for seed in (11, 12, 13, 14)}
    final = drain(http, ids.values())
    assert all(st["status"] == "succeeded" for st in final.values()), final
    assert len({st["worker"] for st in final.values()}) == 2, final  # both replicas ran jobs
    for seed, j in ids.items():
        res = http.get(f"/v1/jobs/{j}/result").json()
        np.testing.assert_array_equal(decode(res["samples"]), solo(seed, LONG))


def test_events_and_synchronous_reconstruct(cluster):
    http = cluster
    j = submit(http, seed=21, method={"name": "dps", "steps": 1500})
    events = []
    with http.stream("GET", f"/v1/jobs/{j}/events", timeout=240) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "status":
                    break
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    steps = [d["progress"]["step"] for k, d in events if k == "progress" and d["status"] == "running"]
    assert steps and steps == sorted(steps) and 0 < steps[-1] <= 1500  # progress from the store
    r = http.post("/v1/reconstruct", json=body(seed=22, **{"return": ["mean", "samples"]}))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.json()["samples"]), solo(22, {"name": "fast", "steps": 8}))


def test_cancel_a_running_and_a_queued_job(cluster):
    http = cluster
    long = {"name": "dps", "steps": 5000}
    ids = [submit(http, seed=s, method=long) for s in (31, 32, 33, 34, 35)]  # 4 held, 1 waiting
    running = wait_for(http, ids[0], lambda st: st["status"] == "running" and st["progress"]["step"] > 10)
    assert running["worker"]
    waiting = [j for j in ids if http.get(f"/v1/jobs/{j}").json()["worker"] is None]
    assert waiting, "with two jobs per replica, the fifth waits in the store"
    r = http.delete(f"/v1/jobs/{waiting[0]}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # no worker held it: at once
    r = http.delete(f"/v1/jobs/{ids[0]}")
    assert r.json()["status"] in ("cancelling", "cancelled")
    st = wait_for(http, ids[0], done, timeout=60)
    assert st["status"] == "cancelled" and st["progress"]["step"] < 5000
    for j in ids:
        http.delete(f"/v1/jobs/{j}")
    drain(http, ids)


def test_backpressure_answers_429_with_retry_after(cluster):
    http = cluster
    long = {"name": "dps", "steps": 5000}
    accepted, refused = [], None
    for s in range(40, 52):
        r = http.post("/v1/jobs", json=body(seed=s, method=long))
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])
    assert refused is not None, f"{len(accepted)} jobs accepted and none refused"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
    # at most what the replicas hold plus what may wait in the store (jobs not yet claimed count as waiting)
    assert 3 <= len(accepted) <= 2 * 2 + 3
    for j in accepted:
        http.delete(f"/v1/jobs/{j}")
    assert all(st["status"] == "cancelled" for st in drain(http, accepted).values())


def test_killing_a_replica_loses_nothing(cluster):
    http = cluster
    seeds = (61, 62, 63, 64)
    ids = {seed: submit(http, seed=seed, method=LONG) for seed in seeds}
    st = wait_for(http, ids[61], lambda st: st["status"] == "running" and st["progress"]["step"] > 50)
    victim = st["worker"]
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)  # the replica's process dies mid-job
    final = drain(http, ids.values())
    assert all(s["status"] == "succeeded" for s in final.values()), final
    assert final[ids[61]]["worker"] != victim  # run again by another replica
    for seed, j in ids.items():
        res = http.get(f"/v1/jobs/{j}/result").json()
        np.testing.assert_array_equal(decode(res["samples"]), solo(seed, LONG))
    assert http.get("/readyz").status_code == 200


def test_the_deploy_configs_name_real_settings_and_build():
    """deploy/serve.yaml and the RayService's serveConfigV2 import the app builder, and every
    argument they pass is a setting (Settings ignores unknown names: a typo would go unnoticed)."""
    from pathlib import Path

    import yaml

    from service.ray_serve import app_builder
    from service.settings import Settings

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    configs = [yaml.safe_load((deploy / "serve.yaml").read_text())]
    for doc in yaml.safe_load_all((deploy / "rayservice.yaml").read_text()):
        if doc["kind"] == "RayService":
            configs.append(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert len(configs) == 2
    for cfg in configs:
        (app,) = cfg["applications"]
        assert app["import_path"] == "service.ray_serve:app_builder"
        assert set(app["args"]) <= set(Settings.model_fields), app["args"]
        assert app_builder(app["args"]) is not None
