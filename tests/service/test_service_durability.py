"""Durable jobs against real server processes: ``kill -9`` and SIGTERM while jobs are queued and
running, then a restart on the same data dir. Every accepted job reaches ``succeeded`` with the
result an uninterrupted run gives (grf-32 is float64: bit for bit), and results finished before
the interruption are still served."""
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers.polling import wait_until
from tests.helpers.server import LONG, done, solo, start_server, stop_server, submit, wait_for
from tests.helpers.service import body, decode, metric

pytestmark = pytest.mark.slow  # real server processes, killed and restarted

#: The SIGTERM test signals once the job is past step 50 and its stream and a waiting
#: ``/v1/reconstruct`` are in place (waited for as states, no sleep): the job must still be running
#: then, i.e. outlast a few polls. 5000 steps of 16 samples: 4 s or more, a wide margin.
LONGER, LONGER_SAMPLES = {"name": "dps", "steps": 5000}, 16


def test_kill_9_then_restart_loses_nothing(tmp_path):
    env = {"RECONSERVE_DATA_DIR": tmp_path / "data", "RECONSERVE_MAX_BATCH": 1}
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            quick = submit(http, seed=5)
            assert wait_for(http, quick, done)["status"] == "succeeded"
            before = http.get(f"/v1/jobs/{quick}/result").json()
            long_ids = [submit(http, seed=s, method=LONG) for s in (1, 2)]
            wait_for(http, long_ids[0], lambda st: st["status"] == "running" and st["progress"]["step"] > 100)
            assert http.get(f"/v1/jobs/{long_ids[1]}").json()["status"] == "queued"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            after = http.get(f"/v1/jobs/{quick}/result").json()
            assert after == before  # finished before the kill: served as it was
            for j, seed in zip(long_ids, (1, 2)):
                st = wait_for(http, j, done, timeout=180)
                assert st["status"] == "succeeded", st
                res = http.get(f"/v1/jobs/{j}/result").json()
                np.testing.assert_array_equal(decode(res["samples"]), solo(seed, LONG))
            assert http.get("/v1/jobs/" + "0" * 32).status_code == 404
    finally:
        stop_server(proc)


def test_sigterm_drains_answers_waiters_and_resumes(tmp_path):
    env = {"RECONSERVE_DATA_DIR": tmp_path / "data", "RECONSERVE_MAX_BATCH": 1}
    proc, url = start_server(env)
    events, waiter = [], {}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            running = submit(http, seed=7, method=LONGER, num_samples=LONGER_SAMPLES)
            wait_for(http, running, lambda st: st["status"] == "running" and st["progress"]["step"] > 50)

            streaming = threading.Event()

            def stream():
                with httpx.stream("GET", f"{url}/v1/jobs/{running}/events", timeout=30) as r:
                    kind = None
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            events.append((kind, json.loads(line[5:])))
                            streaming.set()

            def reconstruct():
                r = httpx.post(f"{url}/v1/reconstruct", timeout=30,
                               json=body(seed=8, method=LONGER, num_samples=LONGER_SAMPLES))
                waiter.update(status=r.status_code, ctype=r.headers.get("content-type"), body=r.json(),
                              retry_after=r.headers.get("retry-after"))

            threads = [threading.Thread(target=f) for f in (stream, reconstruct)]
            for t in threads:
                t.start()
            assert streaming.wait(30), "no event on the job's stream"
            # the synchronous request is in: its job waits behind the running one (max batch 1)
            wait_until(lambda: metric(http, "reconserve_queue_depth"), lambda n: n >= 1, timeout=30,
                       what="the /v1/reconstruct job queued")
            assert http.get(f"/v1/jobs/{running}").json()["status"] == "running"  # what the test is about
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            exit_s = time.monotonic() - t0
            for t in threads:
                t.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"SIGTERM: exited in {exit_s:.2f} s with code {proc.returncode}")
    assert exit_s < 10
    assert events and events[-1][0] == "status", events[-3:]
    assert events[-1][1]["server"] == "shutting_down" and events[-1][1]["id"] == running
    assert waiter["status"] == 503 and waiter["ctype"].startswith("application/json"), waiter
    assert waiter["body"]["error"]["code"] == "shutting_down" and waiter["retry_after"]

    proc, url = start_server(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            st = wait_for(http, running, done, timeout=180)
            assert st["status"] == "succeeded", st
            res = http.get(f"/v1/jobs/{running}/result").json()
            np.testing.assert_array_equal(decode(res["samples"]), solo(7, LONGER, num_samples=LONGER_SAMPLES))
    finally:
        stop_server(proc)
