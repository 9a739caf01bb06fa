"""The job queue and the worker: bounded queue, one worker thread per device, batching.

Batching. The worker takes the oldest queued job and, within ``batch_window_ms``, every
queued job *compatible* with it (up to ``max_batch`` jobs and ``max_batch_rows`` samples):
same model, same method with the same resolved configuration (hence the same schedule),
same ``noise_sigma``, same PDE block, and operators of the same kind, observation shape and
structure (linearity, ``A A^T`` constant, channel separability; for projection ALD, which
works in the operator's SVD basis, operators with an SVD must be identical). The jobs'
network-space observations are concatenated along the batch,
``guidance.driver.sample_batch`` applies each job's own operator to its slice of the batch, and the
sampler runs once with a ``SplitGenerator`` (each job's own seeded stream): one network call
per step serves every job, and each job draws exactly the noise it would draw alone (its samples
agree with a lone run bit for bit for float64 models, and to float32 rounding of the network
at a different batch size otherwise).

If a batch of several jobs fails (divergence, an unexpected error), each job is rerun alone,
so only the job that is at fault fails. Cancellation and deadlines are checked after every
step: a cancelled job leaves its batch at once (its rows are discarded), the batch stops when
no job is left.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError

from guidance.core import DivergedError
from guidance.driver import BatchItem, sample_batch
from guidance.solve import PosteriorStats

from .errors import ApiError, scrub
from .metrics import ServiceMetrics
from .problem import Problem, finish_problem
from .render import observation_view
from .schemas import TERMINAL
from .store import JobRecord, JobStore, StoredResult

log = logging.getLogger("reconserve.jobs")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------- jobs
@dataclass
class JobResult(PosteriorStats):
    samples: np.ndarray  # [K, C, H, W] float32, physical units
    metrics: dict
    nfe: int
    elapsed_s: float
    batched_with: int
    method: dict
    observation_view: np.ndarray | None = None  # what result.png shows as the observation
    _encoded: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"metrics": self.metrics, "nfe": self.nfe, "elapsed_s": self.elapsed_s,
                "batched_with": self.batched_with, "method": self.method}

    @property
    def nbytes(self) -> int:
        """Memory held: the arrays, and their base64 encodings once a response was built."""
        body = self._encoded.get("body", {})
        encoded = sum(len(v["npy"]) for v in body.values() if isinstance(v, dict) and "npy" in v)
        return self.samples.nbytes + (self.observation_view.nbytes if self.observation_view is not None else 0) + encoded


class Job:
    """A job as the service sees it. Queued and running jobs hold their ``problem``; finished
    ones hold their result (read back from the store on demand)."""

    #: Progress wake-ups per listener are at most this frequent: waking an event loop on every
    #: step makes it fight the worker for the GIL (steps of a few ms would take ten times longer).
    PROGRESS_INTERVAL_S = 0.1

    def __init__(self, record: JobRecord, problem: Problem | None = None, deadline_s: float = math.inf):
        self.id = record.id
        self.problem = problem
        self.model_id, self.method, self.seed = record.model, record.method, int(record.seed)
        self.num_samples, self.cost = int(record.num_samples), float(record.cost)
        self.body_digest = record.body_digest  # the idempotency fingerprint of its request
        self.returns = problem.returns if problem is not None else tuple(record.request.get("return") or ("mean", "std"))
        self.status, self.step, self.total = record.status, int(record.step), int(record.total)
        self.created_at, self.started_at, self.finished_at = record.created_at, record.started_at, record.finished_at
        self.error = record.error
        self.worker = record.owner  # the worker replica that holds it (scale-out), else None
        self.result_meta = record.result
        self.result: JobResult | None = None
        self.deadline = time.time() + deadline_s
        self.started_mono: float | None = None
        self.cancel_requested = record.status == "cancelling"
        self.lost = False  # another worker replica took it over (scale-out): leave it unwritten
        self.lock = threading.Lock()
        self.done = threading.Event()
        if self.terminal:
            self.done.set()
        self._listeners: set = set()
        self._last_progress = 0.0
        self._persisted_progress = 0.0

    # -- notification of async waiters (SSE, synchronous reconstruct)
    def subscribe(self, loop, event, progress: bool = True) -> None:
        """``event`` is set (thread-safely, on ``loop``) when the job finishes, and on progress
        (throttled) if ``progress``."""
        with self.lock:
            self._listeners.add((loop, event, progress))
        if self.done.is_set():
            event.set()

    def unsubscribe(self, loop, event, progress: bool = True) -> None:
        with self.lock:
            self._listeners.discard((loop, event, progress))

    def notify(self, progress: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if progress:
                if now - self._last_progress < self.PROGRESS_INTERVAL_S:
                    return
                self._last_progress = now
            listeners = [entry for entry in self._listeners if entry[2] or not progress]
        for loop, event, p in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                self.unsubscribe(loop, event, p)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def status_dict(self) -> dict:
        with self.lock:
            batched = self.result_meta.get("batched_with") if self.result_meta else None
            return {"id": self.id, "status": self.status,
                    "progress": {"step": self.step, "total": self.total},
                    "created_at": self.created_at, "started_at": self.started_at,
                    "finished_at": self.finished_at, "error": dict(self.error) if self.error else None,
                    "model": self.model_id, "method": self.method, "num_samples": self.num_samples,
                    "batched_with": batched, "worker": self.worker}


@dataclass
class Reservation:
    """Room in the queue, held from admission until the job is queued (or refused)."""

    cost: float
    nbytes: int
    held: bool = True


class _BatchStopped(Exception):
    """Raised from the callback when no job of the batch is left (all cancelled, expired or
    put back in the queue for a shutdown)."""


#: Throughput assumed (pixel-evaluations per second) until a batch has been measured.
INITIAL_THROUGHPUT = 2e5


class JobsBase:
    """What every job manager shares: the store, admission bounded by count, cost and bytes
    (``reserve``), submission, jobs by id and their results, and retention. ``JobManager`` runs
    the jobs here; ``service.cluster.ClusterJobs`` hands them to worker replicas (scale-out)."""

    def __init__(self, settings, store: JobStore, metrics: ServiceMetrics | None = None):
        self.settings, self.store = settings, store
        self.metrics = metrics or ServiceMetrics()
        self._active: dict[str, Job] = {}  # queued and running
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()  # finished, in memory
        self._cond = threading.Condition()
        self._reserved = {"count": 0, "cost": 0.0, "bytes": 0}
        self._stop = self._draining = False
        self._timer: threading.Thread | None = None
        self._throughput: float | None = None
        self.preparations = threading.BoundedSemaphore(settings.max_preparations)

    def _measured(self, cost: float, elapsed: float) -> None:
        """A batch of ``cost`` ran in ``elapsed`` s: the throughput behind ``Retry-After``."""
        if elapsed > 0:
            rate = cost / elapsed
            self._throughput = rate if self._throughput is None else 0.7 * self._throughput + 0.3 * rate

    def begin_shutdown(self) -> None:
        raise NotImplementedError

    def _threads(self) -> tuple:
        """The threads ``stop`` waits for."""
        raise NotImplementedError

    def stop(self, timeout: float = 8.0) -> None:
        self.begin_shutdown()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads():
            if t is not None:
                t.join(timeout)

    def _start_retention(self) -> None:
        self._timer = threading.Thread(target=self._retention_loop, name="reconserve-retention", daemon=True)
        self._timer.start()

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ admission
    def _queued_totals(self) -> tuple[int, float, int]:
        """Jobs waiting (count, cost, bytes), reservations included."""
        raise NotImplementedError

    def _running_left(self) -> float:
        """Work left in the running jobs (cost units)."""
        raise NotImplementedError

    def _first_waiting_cost(self) -> float:
        return 0.0

    def retry_after(self, wait_cost: float) -> int:
        """Seconds until ``wait_cost`` pixel-evaluations of work have run, at the measured rate."""
        rate = self._throughput or INITIAL_THROUGHPUT
        return int(min(3600, max(1, math.ceil(wait_cost / rate))))

    def reserve(self, cost: float, nbytes: int) -> Reservation:
        """Room for a job of ``cost`` holding ``nbytes``, or ``429`` (with ``Retry-After``
        estimated from the work ahead) / ``503`` when shutting down. Cheap: call it before any
        costly preparation."""
        s = self.settings
        with self._cond:
            if self._draining:
                raise shutting_down_error()
            count, queued_cost, queued_bytes = self._queued_totals()
            why = None
            if count >= s.queue_size:
                why, wait = f"the queue is full ({s.queue_size} jobs waiting)", self._running_left()
            elif count and queued_cost + cost > s.max_queued_cost:
                why = f"the queue holds {queued_cost:.3g} of {s.max_queued_cost:.3g} pixel-evaluations of work"
                wait = self._running_left() + queued_cost + cost - s.max_queued_cost
            elif count and queued_bytes + nbytes > s.max_queued_bytes:
                why = f"the queued requests hold {queued_bytes} of {s.max_queued_bytes} bytes"
                wait = self._running_left() + self._first_waiting_cost()
            if why:
                self.metrics.rejected.inc()
                after = self.retry_after(wait)
                raise ApiError(429, "queue_full", f"{why}; retry after {after} s",
                               headers={"Retry-After": str(after)})
            self._reserved["count"] += 1
            self._reserved["cost"] += cost
            self._reserved["bytes"] += nbytes
        return Reservation(cost, nbytes)

    def release(self, r: Reservation) -> None:
        with self._cond:
            self._release(r)

    def _release(self, r: Reservation) -> None:
        if r.held:
            r.held = False
            self._reserved["count"] -= 1
            self._reserved["cost"] -= r.cost
            self._reserved["bytes"] -= r.nbytes

    # ------------------------------------------------------------------ jobs
    def submit(self, problem: Problem, reservation: Reservation, request: dict, arrays: dict,
               idempotency_key: str | None = None, body_digest: str | None = None) -> tuple[Job, bool]:
        """Persist the job (durable when this returns), then queue it. Returns ``(job, new)``;
        ``new`` is False when ``idempotency_key`` already named a job (that job is returned)."""
        record = JobRecord(
            id=uuid.uuid4().hex, status="queued", model=problem.model_id, method=problem.plan.name,
            num_samples=problem.num_samples, seed=problem.seed, step=0, total=int(problem.plan.config.steps),
            created_at=now_iso(), started_at=None, finished_at=None, created_ts=time.time(), finished_ts=None,
            request=request, error=None, result=None, bytes=0, cost=problem.cost,
            idempotency_key=idempotency_key, body_digest=body_digest)
        try:
            self.store.insert(record, arrays)
        except IntegrityError:
            self.release(reservation)
            existing = self.by_key(idempotency_key) if idempotency_key else None
            if existing is None:  # pragma: no cover - the key's job expired in between
                raise
            return existing, False
        except Exception:
            self.release(reservation)
            raise
        job = Job(record, problem, self.settings.job_deadline_s)
        self._accepted(job, reservation)
        self.metrics.submitted.inc()
        return job, True

    def _accepted(self, job: Job, reservation: Reservation) -> None:
        """A new job is in the store: release its reservation and run it."""
        raise NotImplementedError


    # ------------------------------------------------------------------ lookups
    def by_key(self, key: str) -> Job | None:
        rec = self.store.find_key(key)
        return self.get(rec.id) if rec is not None else None

    def get(self, job_id: str) -> Job | None:
        """The job (``status == "expired"`` past retention), or None if the store never saw it."""
        with self._cond:
            job = self._active.get(job_id) or self._recent.get(job_id)
        if job is not None:
            return job
        if not (isinstance(job_id, str) and len(job_id) == 32 and job_id.isalnum()):
            return None
        rec = self.store.get(job_id)
        return Job(rec) if rec is not None else None

    def result_of(self, job: Job) -> JobResult:
        """The result of a succeeded job, read back from the store if not in memory."""
        if job.result is None:
            stored = self.store.load_result(job.id)
            if stored is None:  # expired between the lookup and now
                raise ApiError(410, "expired", "the job's result has expired; submit the job again")
            m = job.result_meta or {}
            job.result = JobResult(stored.samples, m.get("metrics", {}), m.get("nfe", 0), m.get("elapsed_s", 0.0),
                                   m.get("batched_with", 1), m.get("method", {}), stored.observation_view)
        return job.result

    # ------------------------------------------------------------------ retention
    def expire(self) -> list[str]:
        s = self.settings
        gone = self.store.expire(ttl_s=s.result_ttl_s, max_jobs=s.max_jobs_kept, max_bytes=s.max_result_bytes)
        with self._cond:
            for job_id in gone:
                job = self._recent.pop(job_id, None)
                if job is not None:
                    job.status = "expired"
        return gone

    def _retention_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=self.settings.retention_interval_s)
                if self._stop:
                    return
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - retention retries at its next tick
                log.exception("retention failed")

    def _remember(self, job: Job) -> None:
        """Keep a finished job in memory (a bounded few; the store has them all)."""
        with self._cond:
            self._active.pop(job.id, None)
            self._recent[job.id] = job
            while len(self._recent) > RECENT_JOBS or sum(
                    j.result.nbytes for j in self._recent.values() if j.result is not None) > RECENT_BYTES:
                self._recent.popitem(last=False)


class JobManager(JobsBase):
    """The queue (bounded by count, cost and bytes), one worker thread (for one device) that
    batches compatible jobs, and retention; every state change is written to ``store`` first.

    With an ``owner`` (a worker replica of ``service.cluster``) jobs come from ``claim`` instead
    of ``submit``: the store's row is held under that owner's lease, renewed while the job is
    here; a cancellation written to the store by any ingress is picked up at the renewal."""

    def __init__(self, settings, store: JobStore, metrics: ServiceMetrics | None = None,
                 owner: str | None = None):
        super().__init__(settings, store, metrics)
        self.device = settings.device
        self.owner = owner
        self._queue: collections.deque[Job] = collections.deque()
        self._paused = False
        self._thread: threading.Thread | None = None
        self._lease: threading.Thread | None = None
        self._running: list[Job] = []
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.running.set_function(lambda: len(self._running))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = self._draining = False
        self._thread = threading.Thread(target=self._loop, name=f"reconserve-worker-{self.device}", daemon=True)
        self._thread.start()
        if self.owner is None:
            self._start_retention()  # (in a cluster the ingress runs retention)
        else:
            self._lease = threading.Thread(target=self._lease_loop, name="reconserve-lease", daemon=True)
            self._lease.start()

    @property
    def alive(self) -> bool:
        """The worker thread runs (``/healthz`` fails otherwise, so the process is restarted)."""
        return self._thread is not None and self._thread.is_alive()

    def begin_shutdown(self) -> None:
        """Stop admitting; the running batch stops at its next step and its jobs go back to
        ``queued`` (in the store, for the next start); waiters are woken."""
        with self._cond:
            self._draining = True
            jobs = list(self._active.values())
            waiting = list(self._queue) if self.owner is not None else []
            if waiting:
                self._queue.clear()
            self._cond.notify_all()
        for job in waiting:  # a worker replica gives back what it has not started
            self._give_back(job)
        for job in jobs:
            job.notify()

    def _threads(self) -> tuple:
        return self._thread, self._timer, self._lease

    def pause(self) -> None:
        """Stop taking jobs from the queue (the running batch goes on)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ admission
    def _queued_totals(self) -> tuple[int, float, int]:
        r = self._reserved
        return (len(self._queue) + r["count"], sum(j.cost for j in self._queue) + r["cost"],
                sum(j.problem.nbytes for j in self._queue) + r["bytes"])

    def _running_left(self) -> float:
        return sum(j.cost * (1 - j.step / max(1, j.total)) for j in list(self._running))

    def _first_waiting_cost(self) -> float:
        return self._queue[0].cost if self._queue else 0.0

    def _accepted(self, job: Job, reservation: Reservation) -> None:
        with self._cond:
            self._release(reservation)
            self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        self._active[job.id] = job
        self._queue.append(job)
        self._cond.notify_all()

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one becomes ``cancelling`` until its step ends."""
        with self._cond:
            job = self._active.get(job_id)
            if job is None:
                return self.get(job_id)
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            job.cancel_requested = True
        if queued:
            self._finish(job, "cancelled", _cancelled_error())
        elif not job.terminal:
            with job.lock:
                job.status = "cancelling"
            self._store("update", job.id, status="cancelling")
            job.notify()
        return job

    def recover(self, rebuild: Callable[[JobRecord, dict], Problem]) -> int:
        """Queue again every job a previous process accepted and did not finish (oldest first),
        rebuilt from its stored request by ``rebuild(record, files)``; it runs from the start with
        its own seed, so its result is the one an uninterrupted run gives. Returns the count.
        (A worker replica recovers nothing: the cluster's ingress hands the jobs over again.)"""
        if self.owner is not None:
            return 0
        count = 0
        for rec in self.store.unfinished():
            if rec.status == "cancelling":
                self.store.finish(rec.id, status="cancelled", finished_at=now_iso(), error=_cancelled_error())
                continue
            try:
                problem = rebuild(rec, self.store.load_request_files(rec))
            except Exception as e:  # noqa: BLE001 - e.g. its model is no longer served
                msg = e.message if isinstance(e, ApiError) else scrub(str(e), 300)
                self.store.finish(rec.id, status="failed", finished_at=now_iso(), error={
                    "code": "unrecoverable", "message": f"the job could not be resumed after a restart: {msg}"})
                continue
            self.store.update(rec.id, status="queued", started_at=None, step=0)
            rec.status, rec.step, rec.started_at = "queued", 0, None
            with self._cond:
                self._enqueue(Job(rec, problem, self.settings.job_deadline_s))
            count += 1
        if count:
            log.info("recovered %d unfinished jobs from the store", count)
        return count

    # ------------------------------------------------------------------ claims (worker replicas)
    def claim(self, job_id: str, rebuild: Callable[[JobRecord, dict], Problem]) -> Job | None:
        """Take a queued job from the shared store and queue it here (None if another replica
        holds it, or it is no longer queued). It runs from the start with its own seed."""
        if self._draining or not self.store.claim(job_id, self.owner):
            return None
        rec = self.store.get(job_id)
        try:
            problem = rebuild(rec, self.store.load_request_files(rec))
        except Exception as e:  # noqa: BLE001 - e.g. its model is not served by this replica
            msg = e.message if isinstance(e, ApiError) else scrub(str(e), 300)
            self.store.finish(job_id, status="failed", finished_at=now_iso(), owner=self.owner, error={
                "code": "unrecoverable", "message": f"the job could not be prepared on its worker: {msg}"})
            return None
        job = Job(rec, problem, rec.created_ts + self.settings.job_deadline_s - time.time())
        with self._cond:
            if self._draining:
                self.store.release(job_id, self.owner, _cancelled_error(), now_iso())
                return None
            self._enqueue(job)
        return job

    def _lease_loop(self) -> None:
        """Renew the lease on the jobs held here; pick up cancellations written elsewhere; drop
        a job another replica took over (after this one missed its renewals)."""
        period = self.settings.lease_s / 3
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=period)
                if self._stop:
                    return
                jobs = {j.id: j for j in self._active.values() if not j.terminal}
            try:
                held = self.store.renew(self.owner, list(jobs))
            except Exception:  # noqa: BLE001 - renewed at the next tick (the lease allows a few misses)
                log.exception("lease renewal failed")
                continue
            for job_id, job in jobs.items():
                status = held.get(job_id)
                if status is None:  # taken over: leave it, without writing to the store
                    job.cancel_requested = job.lost = True
                elif status == "cancelling" and not job.cancel_requested:
                    self.cancel(job_id)

    # ------------------------------------------------------------------ state changes
    def _store(self, what: str, *args, **kwargs) -> bool:
        """A store write from the worker; on failure the job is left for recovery, never lost."""
        if self.owner is not None and what in ("update", "finish"):
            kwargs["owner"] = self.owner
        try:
            getattr(self.store, what)(*args, **kwargs)
            return True
        except Exception:  # noqa: BLE001
            log.exception("job store: %s failed", what)
            return False

    def _finish(self, job: Job, status: str, error: dict | None = None, result: JobResult | None = None) -> bool:
        with job.lock:
            if job.status in TERMINAL:
                return False
        finished_at = now_iso()
        stored = StoredResult(result.samples, result.observation_view, result.meta()) if result is not None else None
        self._store("finish", job.id, status=status, finished_at=finished_at, error=error, result=stored,
                    step=job.total if status == "succeeded" else None)
        with job.lock:
            job.status, job.error, job.result = status, error, result
            job.result_meta = result.meta() if result is not None else None
            job.finished_at = finished_at
            if status == "succeeded":
                job.step = job.total
        problem, job.problem = job.problem, None  # the operator may be large; the result has what is shown
        self.metrics.finished.labels(status).inc()
        if job.started_mono is not None and problem is not None:
            self.metrics.duration.labels(job.model_id, job.method).observe(time.monotonic() - job.started_mono)
        self._remember(job)
        job.done.set()
        job.notify()
        return True

    def _requeue(self, jobs: list[Job]) -> None:
        """Put interrupted jobs back in the queue (shutdown): they rerun from the start. A worker
        replica gives them back to the shared store, unclaimed, for another replica."""
        for job in jobs:
            if job.terminal:
                continue
            if self.owner is not None:
                self._give_back(job)
                continue
            self._store("update", job.id, status="cancelling" if job.cancel_requested else "queued",
                        started_at=None, step=0)
            with job.lock:
                job.status = "cancelling" if job.cancel_requested else "queued"
                job.started_at, job.step = None, 0
            with self._cond:
                self._queue.appendleft(job)
            job.notify()

    def _give_back(self, job: Job) -> None:
        if not job.lost:
            self._store("release", job.id, self.owner, _cancelled_error(), now_iso())
        with job.lock:
            job.status = "queued"
        with self._cond:
            self._active.pop(job.id, None)
        job.done.set()
        job.notify()

    def _check(self, job: Job) -> str | None:
        """``"stop"`` if ``job`` must leave its batch now (finished as cancelled or expired),
        ``"requeue"`` when shutting down, else None."""
        if self._draining:
            return "requeue"
        if job.cancel_requested:
            self._finish(job, "cancelled", _cancelled_error())
            return "stop"
        if time.time() > job.deadline:
            self._finish(job, "failed", {
                "code": "deadline_exceeded",
                "message": f"the job did not finish within {self.settings.job_deadline_s:g} s of its "
                           "submission; send fewer steps or samples, or retry when the queue is shorter"})
            return "stop"
        return None

    # ------------------------------------------------------------------ worker
    def _gather(self, batch: list[Job]) -> None:
        """Move queued jobs compatible with ``batch[0]`` into ``batch`` (lock held)."""
        key = batch[0].problem.batch_key()
        rows = sum(j.num_samples for j in batch)
        for job in list(self._queue):
            if len(batch) >= self.settings.max_batch:
                break
            n = job.num_samples
            if rows + n > self.settings.max_batch_rows or job.cancel_requested:
                continue
            if job.problem.batch_key() == key:
                self._queue.remove(job)
                batch.append(job)
                rows += n

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._draining and (self._paused or not self._queue):
                self._cond.wait()
            if self._draining:
                return None
            batch = [self._queue.popleft()]
            if self.settings.max_batch > 1:
                self._gather(batch)
                end = time.monotonic() + self.settings.batch_window_ms / 1000.0
                while len(batch) < self.settings.max_batch and not self._draining:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    self._gather(batch)
            self._running = list(batch)
            return batch

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch: list[Job] = []
            try:
                batch = self._take() or []
                if not batch:
                    return
                self._execute(batch)
            except Exception:  # noqa: BLE001 - never let the worker die
                log.exception("worker: unexpected error")
                for job in batch:
                    if not job.terminal:
                        self._finish(job, "failed", {"code": "reconstruction_failed",
                                                     "message": "the reconstruction failed unexpectedly; "
                                                                "try other method parameters"})
            finally:
                left = [j for j in batch if not j.terminal]
                if left and self._draining:
                    self._requeue(left)
                self._running = []

    def _execute(self, batch: list[Job]) -> None:
        live = [j for j in batch if self._check(j) is None]
        if not live:
            return
        started = now_iso()
        for job in live:
            # never over a "cancelling" written meanwhile (a cancel between the claim and the start):
            # the row keeps it, and the lease loop or the cancel itself stops the job
            self._store("update", job.id, status="running", started_at=started, step=0,
                        only_from=("queued", "running"))
            with job.lock:
                job.status, job.started_at, job.step = "running", started, 0
                job.started_mono = time.monotonic()
            job.notify()
        if len(live) == 1:
            self._run(live)
            return
        failed = self._run(live, isolate=True)
        for job in failed:  # a batch failed: rerun each job alone so only the culprit fails
            if self._check(job) is None:
                with job.lock:
                    job.step = 0
                self._run([job])

    def _run(self, jobs: list[Job], isolate: bool = False) -> list[Job]:
        """Run ``jobs`` as one batch; returns the jobs to rerun alone (when ``isolate``)."""
        active = {j.id: j for j in jobs}

        def callback(info: dict) -> None:
            step, total = int(info["i"]) + 1, int(info["total"])
            now = time.monotonic()
            for job in list(active.values()):
                if self._check(job) is not None:
                    del active[job.id]
                    continue
                with job.lock:
                    job.step, job.total = step, total
                if now - job._persisted_progress > self.settings.progress_persist_s:
                    job._persisted_progress = now
                    self._store("update", job.id, step=step, total=total)
                job.notify(progress=True)
            if not active:
                raise _BatchStopped()

        problems = [j.problem for j in jobs]
        p0 = problems[0]
        items = [BatchItem(p.operator, p.y, p.num_samples, p.seed) for p in problems]
        try:
            with torch.no_grad():
                xs, nfe, elapsed = sample_batch(
                    p0.model, p0.plan, items, noise_sigma=p0.noise_sigma, pde=p0.pde, device=self.device,
                    shared_svd=len({p.operator_digest for p in problems}) == 1, callback=callback)
        except _BatchStopped:
            return []
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            left = [j for j in jobs if j.id in active and not j.terminal]
            if isolate and left:  # (a job that left the batch may have been the culprit)
                log.info("batch of %d failed (%s); rerunning each job alone", len(left), e)
                return left
            for job in left:
                self._finish(job, "failed", _error_of(e))
            return []
        self._measured(sum(j.cost for j in jobs), elapsed)
        self.metrics.batches.inc()
        self.metrics.nfe.labels(problems[0].model_id).inc(nfe)
        if len(jobs) > 1:
            self.metrics.batched_jobs.inc(len(jobs))
            self.metrics.shared_nfe.inc(nfe * (len(jobs) - 1))
        for job, x in zip(jobs, xs):
            if job.id not in active or job.terminal:
                continue
            try:
                x, metrics = finish_problem(job.problem, x)
                samples = x.float().cpu().numpy()
                if not np.isfinite(samples).all():
                    raise DivergedError("the reconstruction has non-finite values; lower the guidance "
                                        "weight or use more steps")
                view = observation_view(job.problem)
            except Exception as e:  # noqa: BLE001
                self._finish(job, "failed", _error_of(e))
                continue
            self._finish(job, "succeeded", result=JobResult(
                samples, metrics, nfe, elapsed, len(jobs), job.problem.plan.describe(),
                None if view is None else view.astype(np.float32)))
        return []



#: Finished jobs kept in memory (the store has them all).
RECENT_JOBS, RECENT_BYTES = 64, 256 * 1024**2


def shutting_down_error() -> ApiError:
    return ApiError(503, "shutting_down", "the server is shutting down; queued jobs resume when it "
                    "restarts; retry in a few seconds", headers={"Retry-After": "5"})


def _cancelled_error() -> dict:
    return {"code": "cancelled", "message": "the job was cancelled (DELETE); submit it again for a result"}


def _error_of(e: Exception) -> dict:
    if isinstance(e, DivergedError):
        return {"code": "diverged", "message": str(e)}
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"code": "out_of_memory", "message": "the device ran out of memory; send fewer samples "
                                                    "or retry later"}
    log.exception("job failed", exc_info=e)
    msg = scrub(str(e).splitlines()[0], 300) if str(e) else type(e).__name__
    return {"code": "reconstruction_failed", "message": f"the reconstruction failed: {msg}; "
                                                        "try another method or other parameters"}
