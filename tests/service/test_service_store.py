"""The durable job store and what the API builds on it: restarts, retention (410), idempotency
keys, admission before work, cancelling, a dead worker, shutdown, schema versions."""
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa

from guidance.registry import METHODS
from operators.spec import OPERATORS
from service import schemas
from service import store as store_mod
from service.job import cancelled_error as _cancelled_error, now_iso
from service.worker import JobManager
from service.prepare import admit, build
from service.settings import Settings
from service.store import JobStore
from tests.helpers.polling import wait_until
from tests.helpers.postgres import fresh_database
from tests.helpers.service import MODELS, body, slow, wait_running, wait_status


def test_results_survive_a_restart_on_the_same_data_dir(make_client, tmp_path):
    data = tmp_path / "shared"
    c = make_client(data_dir=data)
    jid = c.post("/v1/jobs", json=body()).json()["id"]
    assert wait_status(c, jid)["status"] == "succeeded"
    first = c.get(f"/v1/jobs/{jid}/result").json()
    c2 = make_client(data_dir=data)  # a new process' view: nothing in memory
    assert c2.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"
    assert c2.get(f"/v1/jobs/{jid}/result").json() == first
    assert c2.get(f"/v1/jobs/{jid}/result.png").headers["content-type"] == "image/png"


def test_retention_on_a_timer_answers_410_and_unknown_ids_404(make_client):
    c = make_client(result_ttl_s=0.3, retention_interval_s=0.1)
    jid = c.post("/v1/jobs", json=body()).json()["id"]
    assert wait_status(c, jid)["status"] == "succeeded"
    # no submission in between: the retention timer expires it
    wait_until(lambda: c.get(f"/v1/jobs/{jid}").status_code, lambda code: code == 410, timeout=10,
               what=f"job {jid} expired")
    for path in ("", "/result", "/result.png", "/events"):
        r = c.get(f"/v1/jobs/{jid}{path}")
        assert r.status_code == 410 and r.json()["error"]["code"] == "expired", (path, r.text)
    assert not (c.manager.store.job_dir(jid)).exists()  # its files are gone
    r = c.get("/v1/jobs/" + "ab" * 16)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_job"


def test_retention_counts_every_byte(make_client):
    c = make_client(max_result_bytes=1, retention_interval_s=0.1)  # every finished job is over
    jid = c.post("/v1/jobs", json=body()).json()["id"]
    end = time.monotonic() + 10  # it may expire before a poll sees it succeed
    while c.get(f"/v1/jobs/{jid}").status_code != 410:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_idempotency_key(make_client):
    c = make_client()
    c.manager.pause()
    h = {"Idempotency-Key": "run-42"}
    r1 = c.post("/v1/jobs", json=body(seed=1), headers=h)
    r2 = c.post("/v1/jobs", json=body(seed=1), headers=h)
    assert r1.status_code == 202 and r2.status_code == 200
    assert r1.json()["id"] == r2.json()["id"] and r2.headers["location"] == f"/v1/jobs/{r1.json()['id']}"
    r3 = c.post("/v1/jobs", json=body(seed=2), headers=h)
    assert r3.status_code == 422 and r3.json()["error"]["code"] == "idempotency_key_reused"
    r4 = c.post("/v1/jobs", json=body(seed=1), headers={"Idempotency-Key": "a b"})
    assert r4.status_code == 422 and r4.json()["error"]["code"] == "invalid_idempotency_key"
    c.manager.resume()
    assert wait_status(c, r1.json()["id"])["status"] == "succeeded"
    # after it finished, and after a restart, the key still names the same job
    assert c.post("/v1/jobs", json=body(seed=1), headers=h).json()["id"] == r1.json()["id"]
    c2 = make_client(data_dir=c.manager.store.data_dir)
    r5 = c2.post("/v1/jobs", json=body(seed=1), headers=h)
    assert r5.status_code == 200 and r5.json()["id"] == r1.json()["id"]
    # concurrent retries with one key make one job
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(
        c2.post("/v1/jobs", json=body(seed=9), headers={"Idempotency-Key": "burst"}).json()["id"]))
        for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1


def test_a_job_that_could_never_run_in_time_is_refused_with_what_to_send(make_client):
    client = make_client(max_job_cost=1e8)
    r = client.post("/v1/jobs", json=body(method={"name": "dps", "steps": 5000}, num_samples=64))
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_costly"
    assert "samples" in r.json()["error"]["message"]
    # cg_iters counts: each iteration is a backprop
    r = client.post("/v1/jobs", json=body(method={"name": "fast", "steps": 5000, "cg_iters": 50}, num_samples=8))
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_costly"


def test_admission_before_costly_preparation(make_client):
    c = make_client(queue_size=1)
    running = c.post("/v1/jobs", json=slow(steps=400)).json()["id"]
    wait_running(c, running)
    assert c.post("/v1/jobs", json=body()).status_code == 202  # fills the queue
    cs = body(operator={"kind": "compressed_sensing", "m": 1024, "seed": 3},
              observation=np.zeros(1024).tolist())
    t0 = time.monotonic()
    r = c.post("/v1/jobs", json=cs)
    assert r.status_code == 429 and time.monotonic() - t0 < 1.0
    assert int(r.headers["retry-after"]) >= 1
    c.delete(f"/v1/jobs/{running}")


def test_queue_bounded_by_cost(make_client):
    c = make_client(max_queued_cost=3e6, max_job_cost=3e6)
    c.manager.pause()
    big = body(method={"name": "dps", "steps": 400})  # 400 x 3 x 2 x 1024 = 2.5e6
    assert c.post("/v1/jobs", json=big).status_code == 202
    r = c.post("/v1/jobs", json=big)
    assert r.status_code == 429 and "pixel-evaluations" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert c.post("/v1/jobs", json=body()).status_code == 202  # a small one still fits
    c.manager.resume()


def test_delete_running_answers_cancelling_until_the_step_ends(make_client):
    c = make_client()
    jid = c.post("/v1/jobs", json=slow(steps=400)).json()["id"]
    wait_running(c, jid)
    r = c.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    assert wait_status(c, jid, timeout=5)["status"] == "cancelled"


def test_shutdown_stops_admission_and_requeues_the_running_batch(make_client):
    c = make_client()
    jid = c.post("/v1/jobs", json=slow(steps=400)).json()["id"]
    wait_running(c, jid)
    state = c.app.state.reconserve
    state.begin_shutdown()
    r = c.post("/v1/jobs", json=body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
    end = time.monotonic() + 5
    while c.manager.store.get(jid).status != "queued":
        assert time.monotonic() < end
        time.sleep(0.02)
    with c.stream("GET", f"/v1/jobs/{jid}/events") as s:
        assert '"shutting_down"' in s.read().decode()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_liveness(make_client):
    c = make_client()
    assert c.get("/healthz").status_code == 200

    def die():
        raise SystemExit  # not an Exception: gets past the worker's guard

    c.manager._take = die  # taken after the job below: the worker then dies
    wait_status(c, c.post("/v1/jobs", json=body()).json()["id"])
    c.manager._thread.join(5)
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_dead"
    assert c.get("/readyz").status_code == 503


def test_the_worker_survives_errors_in_taking_and_finishing(make_client):
    c = make_client()
    real = c.manager._finish
    calls = {"n": 0}

    def flaky_finish(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk full")
        return real(*a, **kw)

    c.manager._finish = flaky_finish
    jid = c.post("/v1/jobs", json=body()).json()["id"]
    assert wait_status(c, jid)["status"] == "failed"
    assert c.get("/healthz").status_code == 200
    assert c.post("/v1/reconstruct", json=body()).status_code == 200


def test_schema_versions(tmp_path, monkeypatch):
    s = JobStore(tmp_path)
    assert s.schema_version() == store_mod.SCHEMA_VERSION
    s.close()
    # a newer server opens the older store by running the missing migration steps
    added = []
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", store_mod.SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_mod.MIGRATIONS, store_mod.SCHEMA_VERSION - 1,
                        lambda conn: added.append(conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN note TEXT"))))
    s = JobStore(tmp_path)
    assert s.schema_version() == store_mod.SCHEMA_VERSION and added
    s.close()
    # an older server refuses a newer store
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", store_mod.SCHEMA_VERSION - 1)
    with pytest.raises(RuntimeError, match="newer"):
        JobStore(tmp_path)


@pytest.mark.slow
def test_the_same_store_code_runs_on_postgresql(make_client, pg_url, tmp_path):
    files = tmp_path / "files"
    c = make_client(data_dir=files, database_url=pg_url, result_ttl_s=2.0, retention_interval_s=0.2)
    assert c.manager.store.engine.dialect.name == "postgresql"
    h = {"Idempotency-Key": f"pg-{tmp_path.name}"}
    r = c.post("/v1/jobs", json=body(seed=4), headers=h)
    assert r.status_code == 202
    jid = r.json()["id"]
    assert c.post("/v1/jobs", json=body(seed=4), headers=h).json()["id"] == jid
    assert c.post("/v1/jobs", json=body(seed=5), headers=h).status_code == 422
    assert wait_status(c, jid)["status"] == "succeeded"
    first = c.get(f"/v1/jobs/{jid}/result").json()
    c2 = make_client(data_dir=files, database_url=pg_url)  # another process on the same store
    assert c2.get(f"/v1/jobs/{jid}/result").json() == first
    end = time.monotonic() + 10
    while c.get(f"/v1/jobs/{jid}").status_code != 410:
        assert time.monotonic() < end
        time.sleep(0.1)


def test_a_job_cancelling_at_a_crash_is_cancelled_on_restart(make_client, tmp_path):
    data = tmp_path / "shared"
    c = make_client(data_dir=data)
    c.manager.pause()
    jid = c.post("/v1/jobs", json=body()).json()["id"]
    c.manager.store.update(jid, status="cancelling")  # as a crash mid-step would leave it
    c2 = make_client(data_dir=data)
    st = c2.get(f"/v1/jobs/{jid}").json()
    assert st["status"] == "cancelled" and st["error"]["code"] == "cancelled"


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_claims_leases_and_guarded_writes(db, tmp_path, request):
    """Scale-out's store primitives: one claimant wins, a lease renewal reports the statuses the
    owner still holds, a stale owner's job is released and its later writes change nothing."""
    url = fresh_database(request.getfixturevalue("pg_url"), "reconserve_claims") if db == "postgresql" else None
    s = JobStore(tmp_path, url)
    m = JobManager(Settings(data_dir=tmp_path), s)  # not started: the job stays queued
    request_model = schemas.make_request_model(list(OPERATORS), list(METHODS))
    problem, arrays, stored = build(admit(body(seed=7), request_model, MODELS, m.settings), m.settings, {})
    job, _ = m.submit(problem, m.reserve(problem.cost, 0), stored, arrays)
    assert s.queued_totals()[0] == 1
    assert s.claim(job.id, "a") and not s.claim(job.id, "b")  # one claimant wins
    assert s.queued_totals()[0] == 0
    assert s.renew("a", [job.id]) == {job.id: "queued"} and s.renew("b", [job.id]) == {}
    assert s.update(job.id, owner="a", status="running") and not s.update(job.id, owner="b", step=3)
    assert s.stale(time.time() + 1)[0].owner == "a" and not s.stale(time.time() - 60)
    assert s.release(job.id, "a", _cancelled_error(), now_iso())  # the owner stopped renewing
    rec = s.get(job.id)
    assert (rec.status, rec.owner, rec.step) == ("queued", None, 0)
    assert not s.update(job.id, owner="a", status="succeeded")  # the old owner can no longer write
    assert s.claim(job.id, "b") and s.request_cancel(job.id) and s.get(job.id).status == "cancelling"
    assert s.release(job.id, "b", _cancelled_error(), now_iso()) and s.get(job.id).status == "cancelled"
    assert not s.cancel_queued(job.id, _cancelled_error(), now_iso())
    s.close()


def test_schema_1_stores_are_upgraded_with_the_claim_columns(tmp_path):
    old = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    with old.begin() as c:  # a version-1 store: the jobs table without owner, heartbeat_ts, caller, callback*
        store_mod.metadata.create_all(c)
        c.execute(sa.text("DROP INDEX ix_jobs_callback_due"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN callback_due"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN callback"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN owner"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN heartbeat_ts"))
        c.execute(sa.text("DROP INDEX ix_jobs_caller"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN caller"))
        c.execute(store_mod.version_table.insert().values(version=1))
    old.dispose()
    s = JobStore(tmp_path)
    assert s.schema_version() == 4 and s.queued_totals() == (0, 0.0, 0) and s.stale(time.time()) == []
    s.close()
