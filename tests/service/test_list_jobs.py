"""GET /v1/jobs (issue 20 item 4): the caller's recent jobs, newest first, paged, filtered by status;
with API keys each caller sees only its own; an old store gains the column that says whose."""
import sqlalchemy as sa

from service.store import JobStore
from tests.helpers.service import body, wait_status


def submit(c, n, **headers):
    ids = []
    for i in range(n):
        r = c.post("/v1/jobs", json=body(seed=i, num_samples=1), headers=headers)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def test_newest_first_paged_and_filtered(client):
    ids = submit(client, 5)
    for i in ids:
        wait_status(client, i, "succeeded")
    r = client.get("/v1/jobs", params={"limit": 2})
    assert r.status_code == 200
    seen, token = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"page_token": token} if token else {})}).json()
        seen += [j["id"] for j in page["jobs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]  # newest first, each once
    assert [j["id"] for j in client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]] == ids[::-1]
    assert client.get("/v1/jobs", params={"status": "failed"}).json() == {"jobs": [], "next_page_token": None}
    for bad in ({"status": "nope"}, {"limit": 0}, {"limit": 201}, {"page_token": "%%%"}):
        r = client.get("/v1/jobs", params=bad)
        assert r.status_code == 422, (bad, r.text)


def test_each_caller_sees_its_own(make_client):
    c = make_client(api_keys=("alice-key", "bob-key"))
    a = submit(c, 2, **{"X-API-Key": "alice-key"})
    b = submit(c, 1, **{"Authorization": "Bearer bob-key"})
    mine = lambda key: [j["id"] for j in c.get("/v1/jobs", headers={"X-API-Key": key}).json()["jobs"]]  # noqa: E731
    assert mine("alice-key") == a[::-1] and mine("bob-key") == b
    assert c.get("/v1/jobs").status_code == 401


def test_a_version_2_store_gains_the_caller_column(tmp_path):
    store = JobStore(tmp_path)
    with store.engine.begin() as c:  # make it look like a store written by version 2
        c.execute(sa.text("DROP INDEX ix_jobs_callback_due"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN callback_due"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN callback"))
        c.execute(sa.text("DROP INDEX ix_jobs_caller"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN caller"))
        c.execute(sa.text("UPDATE schema_version SET version = 2"))
    store.close()
    store = JobStore(tmp_path)
    assert store.schema_version() == 4 and store.listing(None) == []
