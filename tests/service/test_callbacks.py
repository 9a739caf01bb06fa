"""Callbacks (docs/API.md "Callbacks"): a real local HTTP receiver gets one signed POST per finished
job, retried after 5xx with exponential backoff, durable across a restart of a real server process;
loopback and private targets are refused unless the settings allow them (here they allow loopback
explicitly, the receiver being on 127.0.0.1)."""
import hashlib
import hmac
import itertools
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy as sa

from service.callbacks import SECRET_FILE
from service.store import JobStore
from tests.helpers.polling import wait_until
from tests.helpers.server import start_server, stop_server
from tests.helpers.service import body, slow, wait_running, wait_status

SECRET = "test-callback-secret"
FAST = {"callback_allow_private": True, "callback_secret": SECRET, "callback_base_delay_s": 0.2}


class Receiver:
    """An ``http.server`` on a free loopback port, in a thread: records each POST (headers, raw
    body, arrival time) and answers the statuses of ``script`` in turn (then 200)."""

    def __init__(self, script=()):
        self.posts, self.script = [], list(script)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append({"headers": dict(self.headers), "body": raw, "at": time.monotonic(),
                                    "path": self.path})
                code = outer.script.pop(0) if outer.script else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_posts(self, n: int, timeout: float = 30.0) -> list:
        return wait_until(lambda: list(self.posts), lambda p: len(p) >= n, timeout=timeout,
                          what=f"{n} POSTs at the receiver")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(script=()):
        made.append(Receiver(script))
        return made[-1]
    yield make
    for r in made:
        r.close()


def verify(post, secret: str = SECRET) -> dict:
    """The POST's signature checked against the raw body -> the body's JSON."""
    expected = "sha256=" + hmac.new(secret.encode(), post["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(post["headers"]["X-Reconserve-Signature"], expected)
    assert post["headers"]["Content-Type"] == "application/json"
    return json.loads(post["body"])


def callback_done(client, job_id, timeout=30.0) -> dict:
    return wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json(),
                      lambda st: st["callback"] is not None and st["callback"]["state"] != "pending",
                      timeout=timeout, what=f"job {job_id}'s callback delivered or failed")


def test_one_signed_post_per_finished_job(make_client, receiver):
    rx = receiver()
    client = make_client(**FAST)
    ok = client.post("/v1/jobs", json=body(callback={"url": rx.url})).json()
    assert ok["callback"] == {"url": rx.url, "state": "pending", "attempts": 0, "last_status": None,
                              "delivered_at": None, "error": None}
    cancelled = client.post("/v1/jobs", json=slow(steps=2000, callback={"url": rx.url + "?job=2"})).json()
    wait_running(client, cancelled["id"])
    client.delete(f"/v1/jobs/{cancelled['id']}")
    plain = client.post("/v1/jobs", json=body(seed=9)).json()  # no callback: nothing is sent
    finals = {j: callback_done(client, j) for j in (ok["id"], cancelled["id"])}
    assert wait_status(client, plain["id"])["callback"] is None
    rx.wait_posts(2)
    time.sleep(0.5)  # (a duplicate would arrive within the poll interval)
    assert len(rx.posts) == 2
    got = {verify(p)["id"]: p for p in rx.posts}
    assert set(got) == set(finals)
    for job_id, st in finals.items():
        sent = verify(got[job_id])
        assert sent == {k: v for k, v in st.items() if k != "callback"}  # the final JobStatus
        assert got[job_id]["headers"]["X-Reconserve-Job"] == job_id
        assert got[job_id]["headers"]["X-Reconserve-Attempt"] == "1"
        cb = st["callback"]
        assert cb["state"] == "delivered" and cb["attempts"] == 1 and cb["last_status"] == 200
        assert cb["delivered_at"] >= st["finished_at"] and cb["error"] is None
    assert finals[ok["id"]]["status"] == "succeeded" and finals[cancelled["id"]]["status"] == "cancelled"
    assert got[cancelled["id"]]["path"] == "/hook?job=2"
    listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
    assert listed[ok["id"]]["callback"]["state"] == "delivered"


def test_a_failed_job_is_posted_too(make_client, receiver):
    rx = receiver()
    client = make_client(**FAST, job_deadline_s=0.5)
    job = client.post("/v1/jobs", json=slow(steps=2000, callback={"url": rx.url})).json()
    st = callback_done(client, job["id"])
    assert st["status"] == "failed" and st["error"]["code"] == "deadline_exceeded"
    sent = verify(rx.wait_posts(1)[0])
    assert sent["status"] == "failed" and sent == {k: v for k, v in st.items() if k != "callback"}
    assert st["callback"]["state"] == "delivered" and len(rx.posts) == 1


def test_third_try_lands_after_two_500s_with_backoff(make_client, receiver):
    rx = receiver([500, 500])
    client = make_client(**FAST)
    job = client.post("/v1/jobs", json=body(callback={"url": rx.url})).json()
    st = callback_done(client, job["id"])
    posts = rx.wait_posts(3)
    assert len(posts) == 3 and len({p["body"] for p in posts}) == 1  # the same signed bytes each time
    assert [verify(p)["id"] for p in posts] == [job["id"]] * 3
    assert [p["headers"]["X-Reconserve-Attempt"] for p in posts] == ["1", "2", "3"]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(posts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # base, then twice the base
    assert st["callback"]["state"] == "delivered" and st["callback"]["attempts"] == 3
    assert st["callback"]["last_status"] == 200 and st["callback"]["error"] is None


def test_4xx_fails_at_once_and_retries_end(make_client, receiver):
    gone, down = receiver([404]), receiver([503] * 5)
    client = make_client(**FAST, callback_attempts=2)
    a = client.post("/v1/jobs", json=body(callback={"url": gone.url})).json()
    b = client.post("/v1/jobs", json=body(seed=4, callback={"url": down.url})).json()
    cb = callback_done(client, a["id"])["callback"]
    assert cb["state"] == "failed" and cb["attempts"] == 1 and cb["last_status"] == 404 and "404" in cb["error"]
    cb = callback_done(client, b["id"])["callback"]
    assert cb["state"] == "failed" and cb["attempts"] == 2 and cb["last_status"] == 503
    assert "gave up after 2 attempts" in cb["error"]
    time.sleep(0.6)  # past another backoff: nothing more is sent
    assert len(gone.posts) == 1 and len(down.posts) == 2


def test_408_and_429_are_retried_and_a_refused_connection_too(make_client, receiver):
    rx = receiver([408, 429])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    client = make_client(**FAST, callback_attempts=2)
    a = client.post("/v1/jobs", json=body(callback={"url": rx.url})).json()
    b = client.post("/v1/jobs", json=body(seed=4, callback={"url": closed})).json()
    cb = callback_done(client, a["id"])["callback"]
    assert cb["state"] == "failed" and cb["attempts"] == 2 and cb["last_status"] == 429
    cb = callback_done(client, b["id"])["callback"]
    assert cb["state"] == "failed" and cb["attempts"] == 2 and cb["last_status"] is None
    assert "connection failed" in cb["error"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost:9/", "http://[::1]/",
                                 "http://10.0.0.7/", "http://192.168.1.1/", "http://169.254.169.254/latest",
                                 "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/"])
def test_loopback_and_private_targets_are_refused_by_default(make_client, url):
    client = make_client()
    r = client.post("/v1/jobs", json=body(callback={"url": url}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_callback", r.text
    assert "RECONSERVE_CALLBACK_ALLOW_PRIVATE" in r.json()["error"]["message"]


@pytest.mark.parametrize("cb", [{"url": "ftp://example.com/x"}, {"url": "example.com/hook"}, {"url": 3},
                                {"uri": "https://example.com/"}, "https://example.com/",
                                {"url": "https://example.com/", "secret": "x"},
                                {"url": "https://user:pw@example.com/"}, {"url": "https://" + "a" * 2100}])
def test_malformed_callbacks_answer_invalid_callback(make_client, cb):
    r = make_client().post("/v1/jobs", json=body(callback=cb))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_callback", r.text
    assert 'send "callback": {"url":' in r.json()["error"]["message"]


def test_a_name_resolving_to_loopback_is_refused_at_delivery(make_client, receiver, monkeypatch):
    """DNS rebinding: a name accepted at admission is checked on the addresses it resolves to."""
    rx = receiver()
    port = rx.server.server_address[1]
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real(
        "127.0.0.1" if host == "hooks.example.com" else host, *a, **k))
    client = make_client(callback_secret=SECRET, callback_base_delay_s=0.2)
    job = client.post("/v1/jobs", json=body(callback={"url": f"http://hooks.example.com:{port}/hook"}))
    assert job.status_code == 202, job.text
    cb = callback_done(client, job.json()["id"])["callback"]
    assert cb["state"] == "failed" and cb["attempts"] == 1 and cb["last_status"] is None
    assert "loopback" in cb["error"]
    assert rx.posts == []


def test_each_address_of_a_name_is_tried_with_the_name_as_host(make_client, receiver, monkeypatch):
    """The POST goes to the addresses looked up (nobody listens on 127.0.0.2: the next one), with
    the URL's host in ``Host``."""
    rx = receiver()
    port = rx.server.server_address[1]
    real = socket.getaddrinfo

    def lookup(host, *a, **k):
        if host != "hooks.example.com":
            return real(host, *a, **k)
        return real("127.0.0.2", *a, **k) + real("127.0.0.1", *a, **k)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    client = make_client(**FAST)
    job = client.post("/v1/jobs", json=body(callback={"url": f"http://hooks.example.com:{port}/hook"})).json()
    cb = callback_done(client, job["id"])["callback"]
    assert cb["state"] == "delivered" and cb["attempts"] == 1
    post = rx.wait_posts(1)[0]
    assert post["headers"]["Host"] == f"hooks.example.com:{port}" and verify(post)["id"] == job["id"]


def test_secret_is_made_once_per_data_dir_and_never_shown(make_client, receiver, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    rx = receiver()
    data = tmp_path / "data"
    client = make_client(data_dir=data, callback_allow_private=True, callback_base_delay_s=0.2)
    path = data / SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) == 64
    job = client.post("/v1/jobs", json=body(callback={"url": rx.url})).json()
    st = callback_done(client, job["id"])
    verify(rx.wait_posts(1)[0], secret)
    seen = client.get(f"/v1/jobs/{job['id']}").text + client.get("/openapi.json").text + caplog.text
    assert secret not in seen and SECRET not in seen
    again = make_client(data_dir=data, callback_allow_private=True)  # the same data dir: the same secret
    assert path.read_text().strip() == secret and again.get(f"/v1/jobs/{job['id']}").json() == st


def test_schema_3_stores_are_upgraded_with_the_callback_columns(tmp_path):
    s = JobStore(tmp_path)
    with s.engine.begin() as c:  # make it look like a store written by version 3
        for statement in ("DROP INDEX ix_jobs_callback_due", "ALTER TABLE jobs DROP COLUMN callback_due",
                          "ALTER TABLE jobs DROP COLUMN callback", "UPDATE schema_version SET version = 3"):
            c.execute(sa.text(statement))
    s.close()
    s = JobStore(tmp_path)
    assert s.schema_version() == 4 and s.due_callbacks(time.time()) == []
    s.close()


@pytest.mark.slow  # real server processes, killed and restarted
def test_a_restart_between_the_job_end_and_the_delivery_still_delivers(tmp_path, receiver):
    rx = receiver([500])
    env = {"RECONSERVE_DATA_DIR": tmp_path / "data", "RECONSERVE_CALLBACK_ALLOW_PRIVATE": "true",
           "RECONSERVE_CALLBACK_SECRET": SECRET, "RECONSERVE_CALLBACK_BASE_DELAY_S": 3}
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            job_id = http.post("/v1/jobs", json=body(callback={"url": rx.url})).json()["id"]
            st = wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json(),
                            lambda s: (s["callback"] or {}).get("last_status") == 500, timeout=60,
                            what="the first attempt answered 500")
            assert st["status"] == "succeeded" and st["callback"]["state"] == "pending"
    finally:
        proc.send_signal(signal.SIGKILL)  # the delivery is pending: its next attempt is due in 3 s
        proc.wait()
    assert len(rx.posts) == 1
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            final = wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json(),
                               lambda s: s["callback"]["state"] != "pending", timeout=60,
                               what="the delivery after the restart")
    finally:
        stop_server(proc)
    assert final["callback"]["state"] == "delivered" and final["callback"]["attempts"] == 2
    posts = rx.wait_posts(2)
    assert len(posts) == 2 and posts[0]["body"] == posts[1]["body"]
    assert verify(posts[1]) == {k: v for k, v in final.items() if k != "callback"}
