"""Load test of the HTTP service: admission control, off-loop body parsing, admission before work.

    .venv/bin/python bench/load_test.py                          # 16 clients x 4 jobs, 32 MiB bodies
    .venv/bin/python bench/load_test.py --clients 32 --jobs-per-client 2
    .venv/bin/python bench/load_test.py --quick                  # 16 x 1, one 20 MiB body, < 60 s

Starts a real server (``service.server.serve``) as a subprocess on a free loopback port, with a
fresh temporary ``RECONSERVE_DATA_DIR``, a small queue (``RECONSERVE_QUEUE_SIZE=4``), one torch
thread and ``RECONSERVE_MAX_BODY_BYTES`` = 96 MiB, waits for ``GET /readyz`` == 200, then:

1. **Burst.** ``--clients`` threads (one ``httpx.Client`` each) submit ``--jobs-per-client`` small
   jobs each (grf-32, inpainting, ``fast`` 8 steps, 2 samples) as fast as they can. A ``429``
   must carry ``Retry-After`` (an integer >= 1); the client sleeps ``min(Retry-After, 0.5 s)`` and
   tries again (bounded). Required: no 5xx, every 429 with a valid ``Retry-After``, every
   accepted (202) job reaches ``succeeded`` and its result can be fetched.
2. **Large bodies.** A JSON body of at least ``--body-mib`` MiB (a grf-32 compressed-sensing
   request whose ``operator.matrix`` is an explicit [m, 1024] nested list of floats, i.e. a
   valid request the server must parse, decode and build) is sent from a thread while another
   thread polls ``GET /healthz`` every 50 ms. Then three such bodies at once. Required: every
   ``/healthz`` answers 200 within 1 s, and no 5xx. (The bodies may be accepted or refused; an
   accepted one must succeed.)
3. **Admission before work.** The queue is filled with slow jobs (grf-32, ``dps`` with many
   steps) until the server answers 429; then costly-to-prepare requests (phantom-64,
   compressed sensing ``m`` 4096 with a ``seed``: a 4096 x 4096 matrix to draw) are sent, 8 at
   once and then 8 one after another. Required: each is refused with ``429`` (with
   ``Retry-After``) in under 1 s, and the server's resident memory (``VmRSS`` of
   ``/proc/<pid>/status``, after minus before, and its peak sampled every 20 ms minus before) grows
   by less than 100 MiB. Then the slow jobs are cancelled.

Everything is bounded: tries per job, poll deadlines, and a watchdog that aborts the whole run
(kills the server, removes the temporary folder, exit status 3) after ``--timeout`` seconds.
Only 127.0.0.1 is contacted (``trust_env=False``: no proxy). Prints a table and writes
``bench/results/load-test.json`` (``--out``); the exit status is 1 when a requirement failed
(each is listed), 2 when the server could not be started, 3 on the watchdog.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, free_port  # noqa: E402

MiB = 1024 * 1024

#: Server settings of the run (besides the port and the data dir).
SERVER_ENV = {
    "RECONSERVE_QUEUE_SIZE": "4",
    "RECONSERVE_TORCH_THREADS": "1",
    "RECONSERVE_MAX_BODY_BYTES": str(96 * MiB),
}

# ----------------------------------------------------------------------------- requirements
HEALTHZ_LIMIT_S = 1.0
REJECT_LIMIT_S = 1.0
RSS_LIMIT_MIB = 100.0


# ----------------------------------------------------------------------------- request bodies
def npy_b64(a) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


_RNG = np.random.default_rng(0)
MASK = (_RNG.random((32, 32)) < 0.5).astype(np.float64)
OBS = _RNG.standard_normal((1, 32, 32))


def small_job(seed: int) -> dict:
    """The burst's job: grf-32, inpainting, fast 8 steps, 2 samples (as tests/service/svc_helpers.body)."""
    return {"model": "grf-32", "operator": {"kind": "inpainting", "mask": {"npy": npy_b64(MASK)}},
            "observation": {"npy": npy_b64(OBS)}, "noise_sigma": 0.0,
            "method": {"name": "fast", "steps": 8}, "num_samples": 2, "seed": seed}


def slow_job(seed: int, steps: int) -> dict:
    """A job that keeps the worker busy: grf-32, inpainting, dps with many steps."""
    return dict(small_job(seed), method={"name": "dps", "steps": steps}, num_samples=2)


def costly_job(seed: int) -> bytes:
    """Cheap to send (about 20 kB), costly to prepare: phantom-64 with a seeded 4096 x 4096
    compressed-sensing matrix to draw (128 MiB of float64, and its SVD)."""
    return json.dumps({"model": "phantom-64", "operator": {"kind": "compressed_sensing", "m": 4096, "seed": 1},
                       "observation": [0.0] * 4096, "noise_sigma": 0.01,
                       "method": {"name": "fast", "steps": 8}, "num_samples": 1, "seed": seed}).encode()


def large_body(min_bytes: int) -> tuple[bytes, int]:
    """A valid grf-32 request of at least ``min_bytes`` bytes: compressed sensing with an explicit
    ``matrix`` [m, 1024] as a nested JSON list of floats. -> (body, m)."""
    rng = np.random.default_rng(7)
    row = json.dumps((rng.standard_normal(1024) / 32).tolist())
    m = int(np.ceil(min_bytes / (len(row) + 2))) + 16
    a = rng.standard_normal((m, 1024)) / np.sqrt(m)
    body = json.dumps({"model": "grf-32", "operator": {"kind": "compressed_sensing", "matrix": a.tolist()},
                       "observation": {"npy": npy_b64(np.zeros(m))}, "noise_sigma": 0.05,
                       "method": {"name": "fast", "steps": 8}, "num_samples": 1, "seed": 5}).encode()
    assert len(body) >= min_bytes, (len(body), min_bytes)
    return body, m


# ----------------------------------------------------------------------------- server
class Server:
    """``service.server.serve`` in a subprocess on 127.0.0.1, output in ``log_path``."""

    def __init__(self, env_overrides: dict):
        self.tmp = Path(tempfile.mkdtemp(prefix="reconserve-load-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp / "server.log"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), RECONSERVE_DATA_DIR=str(self.tmp / "data"),
                        **env_overrides)
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self, ready_timeout: float) -> float:
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from service.server import serve; serve(port={self.port})"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                if time.monotonic() - t0 > ready_timeout:
                    raise RuntimeError(f"server not ready within {ready_timeout:.0f} s:\n{self.log()[-3000:]}")
                try:
                    if c.get("/readyz").status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)

    def rss_mib(self) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            return None
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, keep_log: Path | None = None) -> int | None:
        """SIGTERM, SIGKILL after 20 s; copies the log to ``keep_log``; removes the temporary dir."""
        with self._lock:
            rc = None
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(20)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                rc = self.proc.returncode
            if keep_log is not None and self.log_path.exists():
                try:
                    shutil.copyfile(self.log_path, keep_log)
                except OSError:
                    pass
            shutil.rmtree(self.tmp, ignore_errors=True)
            return rc


def client(url: str, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, trust_env=False,
                        headers={"Content-Type": "application/json"})


# ----------------------------------------------------------------------------- bookkeeping
class Record:
    """Every response of a phase: status counts, 429s and their Retry-After, 5xx details."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.n429 = 0
        self.retry_after_bad: list[dict] = []  # 429s without a valid Retry-After
        self.retry_after_values: Counter = Counter()
        self.server_errors: list[dict] = []  # every 5xx (and transport errors)
        self.unexpected: list[dict] = []  # answers other than the expected ones

    def response(self, what: str, r: httpx.Response, expected=(202,)) -> None:
        with self.lock:
            self.codes[f"{what.split()[0]} {r.status_code}"] += 1
            if r.status_code == 429:
                self.n429 += 1
                ra = r.headers.get("retry-after")
                if ra is None or not ra.strip().isdigit() or int(ra) < 1:
                    self.retry_after_bad.append({"request": what, "retry_after": ra, "body": r.text[:300]})
                else:
                    self.retry_after_values[int(ra)] += 1
            elif r.status_code >= 500:
                self.server_errors.append({"request": what, "status": r.status_code,
                                           "headers": dict(r.headers), "body": r.text[:500]})
            elif r.status_code not in expected:
                self.unexpected.append({"request": what, "status": r.status_code, "body": r.text[:300]})

    def transport_error(self, what: str, e: Exception) -> None:
        with self.lock:
            self.codes[f"{what.split()[0]} transport error"] += 1
            self.server_errors.append({"request": what, "status": None, "error": f"{type(e).__name__}: {e}"})

    def summary(self) -> dict:
        return {"status_codes": dict(sorted(self.codes.items())),
                "n_429": self.n429, "n_429_without_valid_retry_after": len(self.retry_after_bad),
                "retry_after_values": {str(k): v for k, v in sorted(self.retry_after_values.items())},
                "n_5xx_or_transport_errors": len(self.server_errors),
                "server_errors": self.server_errors[:20], "retry_after_bad": self.retry_after_bad[:20],
                "unexpected": self.unexpected[:20]}


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wait_terminal(c: httpx.Client, ids, deadline: float, rec: Record | None = None) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until every job is terminal or ``deadline`` -> id -> final status dict."""
    left, final = list(ids), {}
    while left and time.monotonic() < deadline:
        for job_id in list(left):
            try:
                r = c.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError as e:
                if rec is not None:
                    rec.transport_error(f"GET /v1/jobs/{job_id}", e)
                continue
            if rec is not None:
                rec.response(f"GET /v1/jobs/{job_id}", r, expected=(200,))
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled", "expired"):
                final[job_id] = r.json()
                left.remove(job_id)
        if left:
            time.sleep(0.1)
    for job_id in left:
        final[job_id] = {"id": job_id, "status": "timeout (still not finished)"}
    return final


# ----------------------------------------------------------------------------- phase 1
def phase_burst(url: str, clients: int, jobs_per_client: int, deadline: float, max_tries: int) -> dict:
    rec = Record()
    accepted: list[str] = []
    gave_up: list[dict] = []
    submit_lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def one_client(ci: int):
        with client(url) as c:
            start.wait()
            for j in range(jobs_per_client):
                body = json.dumps(small_job(seed=1000 * ci + j)).encode()
                what = f"POST /v1/jobs (client {ci}, job {j})"
                for attempt in range(max_tries):
                    if time.monotonic() > deadline:
                        with lock:
                            gave_up.append({"request": what, "why": "phase deadline", "tries": attempt})
                        return
                    t0 = time.monotonic()
                    try:
                        r = c.post("/v1/jobs", content=body)
                    except httpx.HTTPError as e:
                        rec.transport_error(what, e)
                        time.sleep(0.2)
                        continue
                    dt = time.monotonic() - t0
                    rec.response(what, r)
                    with lock:
                        submit_lat.append(dt)
                    if r.status_code == 202:
                        with lock:
                            accepted.append(r.json()["id"])
                        break
                    if r.status_code == 429:
                        ra = r.headers.get("retry-after", "")
                        wait = min(float(ra), 0.5) if ra.strip().isdigit() else 0.5
                        time.sleep(wait)
                        continue
                    if r.status_code in (503,):  # 5xx are recorded as failures; try again
                        time.sleep(0.5)
                        continue
                    with lock:
                        gave_up.append({"request": what, "why": f"answered {r.status_code}", "tries": attempt + 1})
                    break
                else:
                    with lock:
                        gave_up.append({"request": what, "why": f"still refused after {max_tries} tries",
                                        "tries": max_tries})

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(one_client, range(clients)))
    t_submitted = time.monotonic() - t0
    with client(url) as c:
        final = wait_terminal(c, accepted, deadline, rec)
        t_done = time.monotonic() - t0
        results_ok = 0
        for job_id, st in final.items():
            if st["status"] == "succeeded":
                r = c.get(f"/v1/jobs/{job_id}/result")
                rec.response(f"GET /v1/jobs/{job_id}/result", r, expected=(200,))
                if r.status_code == 200 and r.json().get("mean") is not None:
                    results_ok += 1
    statuses = Counter(st["status"] for st in final.values())
    not_ok = [st for st in final.values() if st["status"] != "succeeded"]
    n_jobs = clients * jobs_per_client
    return {"clients": clients, "jobs_per_client": jobs_per_client, "jobs_wanted": n_jobs,
            "accepted": len(accepted), "gave_up": gave_up[:20], "n_gave_up": len(gave_up),
            "final_statuses": dict(statuses), "not_succeeded": not_ok[:10], "results_fetched": results_ok,
            "submit_requests": len(submit_lat),
            "submit_latency_s": {"p50": pct(submit_lat, 50), "p95": pct(submit_lat, 95), "max": max(submit_lat, default=None)},
            "all_submitted_s": t_submitted, "all_finished_s": t_done,
            "jobs_per_s": len(accepted) / t_done if t_done > 0 else None, **rec.summary()}


# ----------------------------------------------------------------------------- phase 2
class HealthPoller(threading.Thread):
    """``GET /healthz`` every ``period`` s (the next one at once if one took longer)."""

    def __init__(self, url: str, period: float = 0.05):
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.stop_event = threading.Event()
        self.lat: list[float] = []
        self.bad: list[dict] = []
        self.worst_at = None

    def run(self):
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            nxt = time.monotonic()
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                try:
                    r = c.get("/healthz")
                    ok = r.status_code == 200
                    if not ok:
                        self.bad.append({"status": r.status_code, "body": r.text[:200]})
                except httpx.HTTPError as e:
                    self.bad.append({"error": f"{type(e).__name__}: {e}"})
                dt = time.monotonic() - t0
                if not self.lat or dt > max(self.lat):
                    self.worst_at = t0
                self.lat.append(dt)
                nxt += self.period
                time.sleep(max(0.0, nxt - time.monotonic()))
                nxt = max(nxt, time.monotonic())

    def stop(self) -> dict:
        self.stop_event.set()
        self.join(60)
        return {"polls": len(self.lat), "max_s": max(self.lat, default=None), "p50_s": pct(self.lat, 50),
                "p99_s": pct(self.lat, 99), "over_1s": sum(x >= HEALTHZ_LIMIT_S for x in self.lat),
                "failed": len(self.bad), "failures": self.bad[:5]}


def phase_large(url: str, server: Server, body: bytes, concurrent: int, deadline: float) -> dict:
    rec = Record()
    out: list[dict] = []
    lock = threading.Lock()

    def send(i: int):
        with client(url, timeout=120) as c:
            t0 = time.monotonic()
            try:
                r = c.post("/v1/jobs", content=body)
            except httpx.HTTPError as e:
                rec.transport_error(f"POST /v1/jobs (large body {i})", e)
                return
            dt = time.monotonic() - t0
            rec.response(f"POST /v1/jobs (large body {i})", r, expected=(202, 413, 422, 429))
            try:
                j = r.json()
            except ValueError:
                j = {}
            with lock:
                out.append({"i": i, "status": r.status_code, "seconds": dt, "job": j.get("id"),
                            "code": (j.get("error") or {}).get("code") if isinstance(j.get("error"), dict) else j.get("code")})

    rss0 = server.rss_mib()
    poller = HealthPoller(url)
    poller.start()
    time.sleep(0.3)  # a few polls before
    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    wall = time.monotonic() - t0
    time.sleep(0.3)
    health = poller.stop()
    rss1 = server.rss_mib()
    ids = [o["job"] for o in out if o["status"] == 202 and o["job"]]
    with client(url) as c:
        final = wait_terminal(c, ids, deadline, rec)
    return {"concurrent": concurrent, "body_bytes": len(body), "body_mib": len(body) / MiB,
            "responses": sorted(out, key=lambda o: o["i"]), "wall_s": wall, "healthz": health,
            "accepted_final": {k: v["status"] for k, v in final.items()},
            "rss_before_mib": rss0, "rss_after_mib": rss1, **rec.summary()}


# ----------------------------------------------------------------------------- phase 3
class RssSampler(threading.Thread):
    def __init__(self, server: Server, period: float = 0.02):
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.stop_event = threading.Event()
        self.peak = None

    def run(self):
        while not self.stop_event.is_set():
            v = self.server.rss_mib()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            time.sleep(self.period)

    def stop(self):
        self.stop_event.set()
        self.join(5)
        return self.peak


def phase_admission(url: str, server: Server, n_costly: int, sequential: bool, slow_steps: int,
                    deadline: float) -> dict:
    rec = Record()
    slow_ids: list[str] = []
    fill_codes = []
    with client(url) as c:
        # fill: the worker runs the first slow job(s); the rest wait until the queue is full
        for i in range(24):
            r = c.post("/v1/jobs", content=json.dumps(slow_job(9000 + i, slow_steps)).encode())
            rec.response(f"POST /v1/jobs (slow job {i})", r, expected=(202, 429))
            fill_codes.append(r.status_code)
            if r.status_code == 202:
                slow_ids.append(r.json()["id"])
            elif r.status_code == 429:
                break
            else:
                break
        queue_full = bool(fill_codes) and fill_codes[-1] == 429
        statuses_before = Counter(c.get(f"/v1/jobs/{j}").json()["status"] for j in slow_ids)

    body = costly_job(1)
    lat: list[dict] = []
    lock = threading.Lock()

    def send(i: int, tag: str):
        with client(url, timeout=60) as cc:
            if tag == "concurrent":
                go.wait(30)
            t0 = time.monotonic()
            try:
                r = cc.post("/v1/jobs", content=body)
            except httpx.HTTPError as e:
                rec.transport_error(f"POST /v1/jobs (costly {tag} {i})", e)
                return
            dt = time.monotonic() - t0
            rec.response(f"POST /v1/jobs (costly {tag} {i})", r, expected=(429,))
            try:
                code = (r.json().get("error") or {}).get("code")
            except (ValueError, AttributeError):
                code = None
            with lock:
                lat.append({"mode": tag, "i": i, "status": r.status_code, "code": code, "seconds": dt,
                            "start": t0, "end": t0 + dt,
                            "retry_after": r.headers.get("retry-after")})
            if r.status_code == 202:  # the queue was not full after all: do not let it run
                with lock:
                    slow_ids.append(r.json()["id"])

    go = threading.Event()  # the concurrent requests leave together, once their clients exist
    threads = [threading.Thread(target=send, args=(i, "concurrent"), daemon=True) for i in range(n_costly)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    rss_before = server.rss_mib()
    sampler = RssSampler(server)
    sampler.start()
    go.set()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    conc = [x for x in lat if x["mode"] == "concurrent"]
    conc_wall = (max(x["end"] for x in conc) - min(x["start"] for x in conc)) if conc else None
    if sequential:
        for i in range(n_costly):
            send(i, "sequential")
    time.sleep(0.5)  # anything the requests started would show by now
    rss_peak = sampler.stop()
    rss_after = server.rss_mib()

    with client(url) as c:
        running = [j for j in slow_ids if c.get(f"/v1/jobs/{j}").json()["status"] in ("running", "cancelling")]
        for j in slow_ids:
            r = c.delete(f"/v1/jobs/{j}")
            rec.response(f"DELETE /v1/jobs/{j}", r, expected=(200,))
        final = wait_terminal(c, slow_ids, min(deadline, time.monotonic() + 60), rec)
    secs = [x["seconds"] for x in lat]
    for x in lat:
        del x["start"], x["end"]
    return {"slow_job": {"model": "grf-32", "method": {"name": "dps", "steps": slow_steps}, "num_samples": 2},
            "fill_codes": fill_codes, "queue_full": queue_full, "slow_jobs_accepted": len(slow_ids),
            "slow_statuses_when_full": dict(statuses_before), "running_at_cancel": len(running),
            "costly_request": {"model": "phantom-64", "operator": {"kind": "compressed_sensing", "m": 4096, "seed": 1},
                               "observation": "4096 zeros (nested list)", "body_bytes": len(body)},
            "costly_responses": lat, "concurrent_wall_s": conc_wall,
            "reject_latency_s": {"max": max(secs, default=None), "p50": pct(secs, 50)},
            "over_1s": sum(s >= REJECT_LIMIT_S for s in secs),
            "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_peak_mib": rss_peak,
            "rss_growth_mib": (rss_after - rss_before) if rss_before and rss_after else None,
            "rss_peak_growth_mib": (rss_peak - rss_before) if rss_before and rss_peak else None,
            "slow_final": dict(Counter(v["status"] for v in final.values())), **rec.summary()}


# ----------------------------------------------------------------------------- checks and report
def check(res: dict) -> list[str]:
    fails = []
    b = res.get("burst")
    if b:
        if b["n_5xx_or_transport_errors"]:
            fails.append(f"burst: {b['n_5xx_or_transport_errors']} 5xx or transport errors: {b['server_errors'][:3]}")
        if b["n_429_without_valid_retry_after"]:
            fails.append(f"burst: {b['n_429_without_valid_retry_after']} 429s without a valid Retry-After: "
                         f"{b['retry_after_bad'][:3]}")
        if b["accepted"] != b["jobs_wanted"]:
            fails.append(f"burst: {b['accepted']} of {b['jobs_wanted']} jobs accepted; gave up: {b['gave_up'][:3]}")
        if b["final_statuses"].get("succeeded", 0) != b["accepted"]:
            fails.append(f"burst: of {b['accepted']} accepted jobs, {b['final_statuses']} ({b['not_succeeded'][:3]})")
        if b["results_fetched"] != b["accepted"]:
            fails.append(f"burst: {b['results_fetched']} of {b['accepted']} results fetched")
        if b["unexpected"]:
            fails.append(f"burst: unexpected answers: {b['unexpected'][:3]}")
    for key in ("large_1", "large_3"):
        p = res.get(key)
        if not p:
            continue
        h = p["healthz"]
        if h["max_s"] is None or h["max_s"] >= HEALTHZ_LIMIT_S or h["failed"]:
            fails.append(f"{key}: /healthz max {h['max_s']} s over {h['polls']} polls, {h['failed']} failed "
                         f"({h['failures'][:2]})")
        if p["n_5xx_or_transport_errors"]:
            fails.append(f"{key}: 5xx or transport errors: {p['server_errors'][:3]}")
        if p["n_429_without_valid_retry_after"]:
            fails.append(f"{key}: 429 without a valid Retry-After: {p['retry_after_bad'][:3]}")
        if len(p["responses"]) != p["concurrent"]:
            fails.append(f"{key}: {len(p['responses'])} of {p['concurrent']} large bodies answered")
        bad_final = {k: v for k, v in p["accepted_final"].items() if v != "succeeded"}
        if bad_final:
            fails.append(f"{key}: accepted large-body jobs did not succeed: {bad_final}")
    a = res.get("admission")
    if a:
        if not a["queue_full"]:
            fails.append(f"admission: the queue never answered 429 while filling it (codes {a['fill_codes']})")
        not429 = [x for x in a["costly_responses"] if x["status"] != 429]
        if not429:
            fails.append(f"admission: costly requests not refused with 429: {not429[:4]}")
        if len(a["costly_responses"]) != a["n_costly_sent"]:
            fails.append(f"admission: {len(a['costly_responses'])} of {a['n_costly_sent']} costly requests answered")
        if a["over_1s"]:
            fails.append(f"admission: {a['over_1s']} costly requests took >= {REJECT_LIMIT_S} s "
                         f"(max {a['reject_latency_s']['max']:.2f} s)")
        if a["rss_growth_mib"] is None or a["rss_growth_mib"] >= RSS_LIMIT_MIB:
            fails.append(f"admission: server RSS grew by {a['rss_growth_mib']} MiB (limit {RSS_LIMIT_MIB})")
        if a["rss_peak_growth_mib"] is None or a["rss_peak_growth_mib"] >= RSS_LIMIT_MIB:
            fails.append(f"admission: server RSS peaked {a['rss_peak_growth_mib']} MiB above its start "
                         f"(limit {RSS_LIMIT_MIB}; sampled every 20 ms)")
        if a["n_5xx_or_transport_errors"]:
            fails.append(f"admission: 5xx or transport errors: {a['server_errors'][:3]}")
        if a["n_429_without_valid_retry_after"]:
            fails.append(f"admission: 429 without a valid Retry-After: {a['retry_after_bad'][:3]}")
        if a["unexpected"]:
            fails.append(f"admission: unexpected answers: {a['unexpected'][:3]}")
    if res.get("server_alive_at_end") is False:
        fails.append("the server died during the run")
    return fails


def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(res: dict) -> None:
    rows = []
    b = res.get("burst")
    if b:
        rows += [
            ("burst", "clients x jobs", f"{b['clients']} x {b['jobs_per_client']} = {b['jobs_wanted']}"),
            ("burst", "POST /v1/jobs requests", b["submit_requests"]),
            ("burst", "status codes", b["status_codes"]),
            ("burst", "429s / with valid Retry-After", f"{b['n_429']} / {b['n_429'] - b['n_429_without_valid_retry_after']}"),
            ("burst", "Retry-After values (s: count)", b["retry_after_values"]),
            ("burst", "5xx + transport errors", b["n_5xx_or_transport_errors"]),
            ("burst", "accepted / succeeded / results", f"{b['accepted']} / {b['final_statuses'].get('succeeded', 0)} / {b['results_fetched']}"),
            ("burst", "submit latency p50 / p95 / max", f"{fmt(b['submit_latency_s']['p50'])} / {fmt(b['submit_latency_s']['p95'])} / {fmt(b['submit_latency_s']['max'])} s"),
            ("burst", "all submitted / all finished", f"{fmt(b['all_submitted_s'], 2)} / {fmt(b['all_finished_s'], 2)} s"),
            ("burst", "jobs/s (accepted / time to all finished)", fmt(b["jobs_per_s"], 2)),
        ]
    for key in ("large_1", "large_3"):
        p = res.get(key)
        if not p:
            continue
        resp = ", ".join(f"{o['status']}{'/' + o['code'] if o.get('code') else ''} in {o['seconds']:.2f} s" for o in p["responses"])
        rows += [
            (key, "bodies x size", f"{p['concurrent']} x {p['body_mib']:.1f} MiB"),
            (key, "answers", resp),
            (key, "accepted jobs' final status", p["accepted_final"] or "-"),
            (key, "/healthz polls / failed", f"{p['healthz']['polls']} / {p['healthz']['failed']}"),
            (key, "/healthz p50 / p99 / max", f"{fmt(p['healthz']['p50_s'])} / {fmt(p['healthz']['p99_s'])} / {fmt(p['healthz']['max_s'])} s"),
            (key, "server RSS before / after", f"{fmt(p['rss_before_mib'], 0)} / {fmt(p['rss_after_mib'], 0)} MiB"),
        ]
    a = res.get("admission")
    if a:
        codes = Counter(f"{x['status']}/{x['code']}" for x in a["costly_responses"])
        rows += [
            ("admission", "slow jobs accepted (statuses)", f"{a['slow_jobs_accepted']} {a['slow_statuses_when_full']}"),
            ("admission", "queue full (429 while filling)", a["queue_full"]),
            ("admission", "costly requests sent / answers", f"{a['n_costly_sent']} / {dict(codes)}"),
            ("admission", "reject latency p50 / max", f"{fmt(a['reject_latency_s']['p50'])} / {fmt(a['reject_latency_s']['max'])} s"),
            ("admission", f"{a['n_costly_sent'] // (1 if res['settings']['quick'] else 2)} at once: first sent to last answered", f"{fmt(a['concurrent_wall_s'], 3)} s"),
            ("admission", "server RSS before / after / peak", f"{fmt(a['rss_before_mib'], 1)} / {fmt(a['rss_after_mib'], 1)} / {fmt(a['rss_peak_mib'], 1)} MiB"),
            ("admission", "RSS growth (after - before / peak - before)", f"{fmt(a['rss_growth_mib'], 1)} / {fmt(a['rss_peak_growth_mib'], 1)} MiB"),
            ("admission", "slow jobs after DELETE", a["slow_final"]),
        ]
    w0 = max(len(r[0]) for r in rows) if rows else 0
    w1 = max(len(r[1]) for r in rows) if rows else 0
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")


def machine() -> dict:
    try:
        import torch
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001
        torch_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        commit, dirty = None, None
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch_version, "httpx": httpx.__version__,
            "git_commit": commit, "git_dirty": dirty}


def log_problems(text: str) -> list[str]:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if "Traceback" in line or " ERROR" in line or "ERROR:" in line]
    return ["\n".join(lines[max(0, i - 2): i + 25]) for i in hits[:5]]


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--jobs-per-client", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="16 clients x 1 job, one 20 MiB body, 8 costly requests at once")
    ap.add_argument("--body-mib", type=float, default=None, help="size of the large body (default 32, --quick 20)")
    ap.add_argument("--costly", type=int, default=8, help="costly requests (at once, then one after another)")
    ap.add_argument("--slow-steps", type=int, default=3000, help="dps steps of the jobs that fill the queue")
    ap.add_argument("--max-tries", type=int, default=400, help="tries per burst job before giving up")
    ap.add_argument("--timeout", type=float, default=300.0, help="abort the whole run after this many seconds")
    ap.add_argument("--out", type=Path, default=RESULTS / "load-test.json")
    args = ap.parse_args(argv)
    if args.quick:
        if "--jobs-per-client" not in (argv or sys.argv):
            args.jobs_per_client = 1
        args.timeout = min(args.timeout, 120.0)
    body_mib = args.body_mib if args.body_mib is not None else (20.0 if args.quick else 32.0)
    if body_mib < 20:
        ap.error("--body-mib must be at least 20")

    t_start = time.monotonic()
    res: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join([".venv/bin/python", "bench/load_test.py", *(argv if argv is not None else sys.argv[1:])]),
                 "settings": {"clients": args.clients, "jobs_per_client": args.jobs_per_client, "quick": args.quick,
                              "body_mib": body_mib, "costly": args.costly, "slow_steps": args.slow_steps,
                              "max_tries": args.max_tries, "timeout_s": args.timeout, "server_env": SERVER_ENV,
                              "limits": {"healthz_s": HEALTHZ_LIMIT_S, "reject_s": REJECT_LIMIT_S,
                                         "rss_growth_mib": RSS_LIMIT_MIB}},
                 "machine": machine()}
    server = Server(SERVER_ENV)

    def write(r: dict):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2, default=str) + "\n")

    def watchdog():
        print(f"\nABORT: the load test ran over {args.timeout:.0f} s (watchdog); server log tail:\n"
              f"{server.log()[-3000:]}", file=sys.stderr, flush=True)
        res["aborted"] = f"watchdog after {args.timeout:.0f} s"
        res["server_log_tail"] = server.log()[-5000:]
        try:
            write(res)
        finally:
            try:
                if server.proc is not None and server.proc.poll() is None:
                    server.proc.kill()
            finally:
                shutil.rmtree(server.tmp, ignore_errors=True)
                os._exit(3)

    dog = threading.Timer(args.timeout, watchdog)
    dog.daemon = True
    dog.start()
    deadline = t_start + args.timeout - 10
    try:
        try:
            res["server_start_s"] = server.start(ready_timeout=min(120.0, args.timeout / 2))
        except RuntimeError as e:
            print(f"ERROR: could not start the server: {e}", file=sys.stderr)
            res["aborted"] = f"server did not start: {str(e)[:2000]}"
            write(res)
            return 2
        print(f"server ready on {server.url} in {res['server_start_s']:.1f} s (pid {server.proc.pid}, RSS "
              f"{server.rss_mib():.0f} MiB); log {server.log_path}", flush=True)
        with client(server.url) as c:  # idle /healthz baseline
            lat = []
            for _ in range(10):
                t0 = time.monotonic()
                c.get("/healthz")
                lat.append(time.monotonic() - t0)
        res["healthz_idle_s"] = {"p50": pct(lat, 50), "max": max(lat)}

        print(f"[1] burst: {args.clients} clients x {args.jobs_per_client} jobs ...", flush=True)
        phase_deadline = min(deadline, time.monotonic() + (45 if args.quick else 120))
        res["burst"] = phase_burst(server.url, args.clients, args.jobs_per_client, phase_deadline, args.max_tries)

        body, m = large_body(int(body_mib * MiB))
        print(f"[2] large body: {len(body) / MiB:.1f} MiB (compressed sensing matrix [{m}, 1024]), "
              f"/healthz every 50 ms ...", flush=True)
        res["large_body"] = {"bytes": len(body), "matrix_shape": [m, 1024]}
        res["large_1"] = phase_large(server.url, server, body, 1, min(deadline, time.monotonic() + 60))
        if not args.quick:
            print("[2] three large bodies at once ...", flush=True)
            res["large_3"] = phase_large(server.url, server, body, 3, min(deadline, time.monotonic() + 90))
        del body

        print(f"[3] admission: fill the queue with dps {args.slow_steps}-step jobs, then {args.costly} costly "
              f"requests at once{'' if args.quick else ' and ' + str(args.costly) + ' one after another'} ...", flush=True)
        res["admission"] = phase_admission(server.url, server, args.costly, not args.quick, args.slow_steps,
                                           min(deadline, time.monotonic() + 90))
        res["admission"]["n_costly_sent"] = args.costly * (1 if args.quick else 2)
        res["server_alive_at_end"] = server.alive()
    finally:
        res["wall_s"] = time.monotonic() - t_start
        log = server.log()
        res["server_log_problems"] = log_problems(log)
        res["server_exit_status"] = server.stop()
        dog.cancel()

    fails = check(res)
    res["requirements_failed"] = fails
    res["passed"] = not fails
    write(res)
    print()
    print_table(res)
    print(f"\nwall {res['wall_s']:.1f} s; server log: {len(res['server_log_problems'])} tracebacks/errors; "
          f"written {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    for p in res["server_log_problems"][:2]:
        print("---- server log excerpt ----\n" + p)
    if fails:
        print("\nFAILED requirements:")
        for f in fails:
            print(" -", f)
        return 1
    print("all requirements met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
