"""Jobs as every job manager keeps them: the store, admission, submission, lookups, retention.

``JobsBase`` is shared by ``service.worker.JobManager`` (runs the jobs in this process: queue,
batching, execution; recovery and leases in ``service.lifecycle``) and
``service.cluster.ClusterJobs`` (hands them to worker replicas). The job itself is
``service.job.Job``; the validated problem it runs is ``service.problem.Problem``.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

from sqlalchemy.exc import IntegrityError

from .admission import Admission, Reservation
from .callbacks import initial_state, pending
from .job import Job, JobResult, ResultExpired, now_iso
from .metrics import ServiceMetrics
from .problem import Problem
from .store import JobRecord, JobStore

log = logging.getLogger("reconserve.jobs")

#: Finished jobs kept in memory (the store has them all).
RECENT_JOBS, RECENT_BYTES = 64, 256 * 1024**2


class JobsBase(Admission):
    """What every job manager shares: the store, admission bounded by count, cost and bytes
    (``reserve``, ``service.admission``), submission, jobs by id and their results, and
    retention. ``JobManager`` runs the jobs here; ``service.cluster.ClusterJobs`` hands them to
    worker replicas (scale-out)."""

    def __init__(self, settings, store: JobStore, metrics: ServiceMetrics | None = None):
        self.settings, self.store = settings, store
        self.metrics = metrics or ServiceMetrics()
        self._active: dict[str, Job] = {}  # queued and running
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()  # finished, in memory
        self._cond = threading.Condition()
        self._init_admission()
        self._stop = self._draining = False
        self._timer: threading.Thread | None = None
        self.preparations = threading.BoundedSemaphore(settings.max_preparations)

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

    # ------------------------------------------------------------------ jobs
    def submit(self, problem: Problem, reservation: Reservation, request: dict, arrays: dict,
               idempotency_key: str | None = None, body_digest: str | None = None,
               caller: str | None = None) -> tuple[Job, bool]:
        """Persist the job (durable when this returns), then queue it. Returns ``(job, new)``;
        ``new`` is False when ``idempotency_key`` already named a job (that job is returned)."""
        callback = initial_state(request.get("callback"))  # kept in its own column, not with the request
        request = {k: v for k, v in request.items() if k != "callback"}
        record = JobRecord(
            id=uuid.uuid4().hex, status="queued", model=problem.model_id, method=problem.plan.name,
            num_samples=problem.num_samples, seed=problem.seed, step=0, total=int(problem.plan.config.steps),
            created_at=now_iso(), started_at=None, finished_at=None, created_ts=time.time(), finished_ts=None,
            request=request, error=None, result=None, bytes=0, cost=problem.cost,
            idempotency_key=idempotency_key, body_digest=body_digest, caller=caller,
            callback=callback, callback_due=0.0 if callback else None)  # (due once the job ends)
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

    def listing(self, caller: str | None, statuses: tuple[str, ...], limit: int,
                after: tuple[float, str] | None) -> list[Job]:
        """A caller's jobs, newest first (``JobStore.listing``), live ones as this process sees them."""
        records = self.store.listing(caller, statuses, limit, after)
        with self._cond:
            live = [self._active.get(r.id) or self._recent.get(r.id) for r in records]
        for j, r in zip(live, records):
            if j is not None:
                j.callback = r.callback  # its delivery goes on in the store
        return [j if j is not None else Job(r) for j, r in zip(live, records)]

    def get(self, job_id: str) -> Job | None:
        """The job (``status == "expired"`` past retention), or None if the store never saw it."""
        with self._cond:
            job = self._active.get(job_id) or self._recent.get(job_id)
        if job is not None:
            if job.terminal and pending(job.callback):  # its delivery goes on in the store
                rec = self.store.states([job_id]).get(job_id)
                job.callback = rec.callback if rec is not None else job.callback
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
                raise ResultExpired()
            job.result = JobResult.from_meta(stored.samples, stored.observation_view, job.result_meta)
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
