"""The worker's lifecycle: shutdown and requeueing, recovery after a restart, and the claims
and leases of a worker replica (scale-out, ``service.cluster``).

A mixin of ``service.worker.JobManager`` (it uses the manager's queue, store writes and
``_finish``): every path by which a job enters this process other than ``submit``, or leaves
it unfinished.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .job import Job, cancelled_error, now_iso, unrecoverable_error
from .problem import Problem
from .store import JobRecord

log = logging.getLogger("reconserve.jobs")


class Lifecycle:
    """Shutdown, recovery, claims and leases of ``JobManager``."""

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
        deliveries = getattr(self, "deliveries", None)
        if deliveries is not None:  # its thread sees the shutdown now, not at its next poll
            deliveries.wake()

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
                self.store.finish(rec.id, status="cancelled", finished_at=now_iso(), error=cancelled_error())
                continue
            try:
                problem = rebuild(rec, self.store.load_request_files(rec))
            except Exception as e:  # noqa: BLE001 - e.g. its model is no longer served
                self.store.finish(rec.id, status="failed", finished_at=now_iso(),
                                  error=unrecoverable_error(e, "resumed after a restart"))
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
            self.store.finish(job_id, status="failed", finished_at=now_iso(), owner=self.owner,
                              error=unrecoverable_error(e, "prepared on its worker"))
            return None
        job = Job(rec, problem, rec.created_ts + self.settings.job_deadline_s - time.time())
        with self._cond:
            if self._draining:
                self.store.release(job_id, self.owner, cancelled_error(), now_iso())
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
            self._store("release", job.id, self.owner, cancelled_error(), now_iso())
        with job.lock:
            job.status = "queued"
        with self._cond:
            self._active.pop(job.id, None)
        job.done.set()
        job.notify()
