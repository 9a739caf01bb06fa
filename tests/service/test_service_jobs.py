"""Jobs: queue limits, events, cancellation, deadlines, divergence, batching."""
import json

import numpy as np
import pytest

from tests.helpers.service import OBS, body, decode, metric, npy_b64, slow, wait_running, wait_status


# ----------------------------------------------------------------------------- lifecycle
def test_submit_status_location(client):
    r = client.post("/v1/jobs", json=body())
    assert r.status_code == 202
    st = r.json()
    assert r.headers["location"] == f"/v1/jobs/{st['id']}"
    assert st["status"] in ("queued", "running") and set(st["progress"]) == {"step", "total"}
    assert st["created_at"] and st["error"] is None
    done = wait_status(client, st["id"])
    assert done["status"] == "succeeded" and done["progress"] == {"step": 8, "total": 8}
    assert done["started_at"] and done["finished_at"]
    assert client.get(r.headers["location"]).json()["status"] == "succeeded"


def test_events_stream_progress_then_final_status(client):
    jid = client.post("/v1/jobs", json=slow(steps=12)).json()["id"]
    with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events.append((lines["event"], json.loads(lines["data"])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "status" and kinds.count("status") == 1 and set(kinds[:-1]) == {"progress"}
    steps = [d["progress"]["step"] for k, d in events[:-1]]
    assert steps == sorted(steps) and max(steps) >= 1
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["progress"]["step"] == 12
    # a finished job's stream is just its final status
    with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
        text = r.read().decode()
    assert text.startswith("event: status") and text.count("event:") == 1


def test_cancel_running_and_queued(client):
    jid = client.post("/v1/jobs", json=slow(steps=400)).json()["id"]
    wait_running(client, jid)
    r = client.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 200
    st = wait_status(client, jid, timeout=5)
    assert st["status"] == "cancelled" and st["error"]["code"] == "cancelled"
    assert st["progress"]["step"] < 400
    r = client.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "cancelled"
    with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
        assert '"cancelled"' in r.read().decode()
    # a queued job is cancelled at once; DELETE again is harmless
    client.manager.pause()
    jid = client.post("/v1/jobs", json=body()).json()["id"]
    r = client.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
    client.manager.resume()
    # the server goes on serving
    assert client.post("/v1/reconstruct", json=body()).status_code == 200


def test_queue_full_429(make_client):
    c = make_client(queue_size=1)
    running = c.post("/v1/jobs", json=slow(steps=400)).json()["id"]
    wait_running(c, running)
    assert c.post("/v1/jobs", json=body()).status_code == 202  # fills the queue
    r = c.post("/v1/jobs", json=body())
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1
    r = c.post("/v1/reconstruct", json=body())
    assert r.status_code == 429
    c.delete(f"/v1/jobs/{running}")


def test_deadline(make_client):
    c = make_client(job_deadline_s=0.3)
    jid = c.post("/v1/jobs", json=slow(steps=200)).json()["id"]
    st = wait_status(c, jid, timeout=10)
    assert st["status"] == "failed" and st["error"]["code"] == "deadline_exceeded"
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 422 and r.json()["error"]["code"] == "deadline_exceeded"


def test_divergence_fails_the_job_not_the_server(client):
    huge = body(observation={"npy": npy_b64(np.full((1, 32, 32), 1e306))})
    r = client.post("/v1/reconstruct", json=huge)
    assert r.status_code == 422 and r.json()["error"]["code"] == "diverged"
    jid = client.post("/v1/jobs", json=huge).json()["id"]
    st = wait_status(client, jid)
    assert st["status"] == "failed" and st["error"]["code"] == "diverged"
    assert client.get(f"/v1/jobs/{jid}/result").json()["error"]["code"] == "diverged"
    assert client.post("/v1/reconstruct", json=body()).status_code == 200


def test_metrics(client):
    client.post("/v1/reconstruct", json=body())
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("reconserve_queue_depth", "reconserve_jobs_running", "reconserve_network_evaluations_total",
                 "reconserve_jobs_finished_total", "reconserve_job_duration_seconds_bucket"):
        assert name in text
    assert 'le="3600.0"' in text and 'model="grf-32"' in text and 'method="fast"' in text
    assert metric(client, "reconserve_jobs_finished_total", status="succeeded") >= 1
    assert metric(client, "reconserve_network_evaluations_total", model="grf-32") >= 8


# ----------------------------------------------------------------------------- batching
RNG = np.random.default_rng(7)


def other_job(seed, num_samples=1, **kw):
    mask = (RNG.random((32, 32)) < 0.3).astype(float)
    obs = RNG.standard_normal((1, 32, 32))
    return body(operator={"kind": "inpainting", "mask": {"npy": npy_b64(mask)}},
                observation={"npy": npy_b64(obs)}, seed=seed, num_samples=num_samples, **kw)


@pytest.mark.parametrize("method,noise", [({"name": "fast", "steps": 8}, 0.0),
                                          ({"name": "fast", "steps": 8}, 0.1),
                                          ({"name": "dps", "steps": 6}, 0.05),
                                          ({"name": "ald", "steps": 5, "final_corrector_steps": 4}, 0.1)])
def test_batched_jobs_share_network_calls_and_match_solo_runs(make_client, method, noise):
    c = make_client()
    a = body(method=method, noise_sigma=noise, **{"return": ["samples"]})
    same_op = body(method=method, noise_sigma=noise, seed=11, num_samples=3,
                   observation={"npy": npy_b64(-OBS)}, **{"return": ["samples"]})
    other_op = other_job(5, 2, method=method, noise_sigma=noise, **{"return": ["samples"]})
    incompatible = body(method={"name": "fast", "steps": 7}, noise_sigma=noise)
    jobs = [a, same_op, other_op, incompatible]

    nfe0 = metric(c, "reconserve_network_evaluations_total", model="grf-32")
    c.manager.pause()
    ids = [c.post("/v1/jobs", json=j).json()["id"] for j in jobs]
    c.manager.resume()
    results = []
    for jid in ids:
        assert wait_status(c, jid)["status"] == "succeeded"
        results.append(c.get(f"/v1/jobs/{jid}/result").json())
    per_job = results[0]["nfe"]
    ald = method["name"] == "ald"
    batched = [2, 2] if ald else [3, 3, 3]  # ALD's SVD basis: only identical operators batch
    assert [r["batched_with"] for r in results[:len(batched)]] == batched
    assert results[3]["batched_with"] == 1 and results[3]["nfe"] == 7
    assert all(r["nfe"] == per_job for r in results[:3])  # one network call per step served them all
    spent = metric(c, "reconserve_network_evaluations_total", model="grf-32") - nfe0
    assert spent == per_job * (2 if ald else 1) + 7

    # each job alone (batching off) gives exactly the same samples
    solo = make_client(max_batch=1)
    for job, res in zip(jobs[:3], results):
        alone = solo.post("/v1/reconstruct", json=job).json()
        assert alone["batched_with"] == 1
        np.testing.assert_array_equal(decode(res["samples"]), decode(alone["samples"]))
        assert res["metrics"] == alone["metrics"]


def test_cancelling_one_batched_job_keeps_the_others(make_client):
    c = make_client()
    c.manager.pause()
    a = c.post("/v1/jobs", json=slow(steps=25, seed=1)).json()["id"]
    b = c.post("/v1/jobs", json=slow(steps=25, seed=2)).json()["id"]
    c.manager.resume()
    wait_running(c, a)
    assert c.delete(f"/v1/jobs/{a}").status_code == 200
    assert wait_status(c, a)["status"] == "cancelled"
    assert wait_status(c, b)["status"] == "succeeded"
    res = c.get(f"/v1/jobs/{b}/result").json()
    assert res["batched_with"] == 2
    alone = c.post("/v1/reconstruct", json=body(method={"name": "fast", "steps": 25}, num_samples=1,
                                                seed=2)).json()  # grf-32: the same prior, not slowed
    np.testing.assert_array_equal(decode(res["mean"]), decode(alone["mean"]))


def test_a_diverging_job_does_not_fail_its_batch(make_client):
    c = make_client()
    c.manager.pause()
    bad = c.post("/v1/jobs", json=body(observation={"npy": npy_b64(np.full((1, 32, 32), 1e306))})).json()["id"]
    good = c.post("/v1/jobs", json=body(seed=4)).json()["id"]
    c.manager.resume()
    assert wait_status(c, bad)["error"]["code"] == "diverged"
    assert wait_status(c, good)["status"] == "succeeded"
    alone = c.post("/v1/reconstruct", json=body(seed=4)).json()
    np.testing.assert_array_equal(decode(c.get(f"/v1/jobs/{good}/result").json()["mean"]),
                                  decode(alone["mean"]))
