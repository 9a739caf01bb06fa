"""Scale-out: the ingress side of a cluster (``service/ray_serve.py`` runs it on Ray Serve).

The shared job store (PostgreSQL) is the one source of truth. The ingress (the same FastAPI
app) admits a job, writes it to the store and hands its id to the worker deployment
(``dispatch``); a worker replica *claims* the row, runs the job with the single-host
``JobManager`` (batching compatible jobs), writes progress and the result to the store, and
renews a lease on the row while it holds it. The ingress reads job states back from the store
(``poll_s``), so any ingress replica reports any job, and cancels by writing ``cancelling``.

Nothing accepted is lost: a job whose worker stops renewing its lease (the replica died) is
released to ``queued`` and dispatched again; it reruns from the start with its own seed, so
its result is the one an uninterrupted run gives. A worker that lost its lease can no longer
write the row (writes are guarded by ownership).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Awaitable, Callable

from .admission import Reservation
from .job import Job, cancelled_error, now_iso
from .jobs import JobsBase
from .metrics import ServiceMetrics
from .schemas import TERMINAL
from .store import JobStore

log = logging.getLogger("reconserve.cluster")


class ClusterJobs(JobsBase):
    """Jobs of a cluster as one ingress sees them: admitted here, run by worker replicas
    (``dispatch(job_id)`` hands one over and returns when the replica lets go of it)."""

    def __init__(self, settings, store: JobStore, metrics: ServiceMetrics | None = None,
                 dispatch: Callable[[str], Awaitable[dict]] | None = None,
                 probe: Callable[[], Awaitable[dict]] | None = None):
        super().__init__(settings, store, metrics)
        self.dispatch, self.probe = dispatch, probe
        #: a worker replica has answered ``probe`` (readiness: jobs can run)
        self.workers_ready = probe is None
        self._dispatching: set[str] = set()  # ids handed to the workers by this ingress, not yet let go
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: threading.Thread | None = None
        self._waiting = 0
        self.metrics.queue_depth.set_function(lambda: self._waiting)
        self.metrics.running.set_function(lambda: sum(j.status == "running" for j in list(self._active.values())))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Call on the app's event loop (the lifespan): dispatches run there."""
        self._loop = asyncio.get_running_loop()
        self._stop = self._draining = False
        self._watcher = threading.Thread(target=self._watch_loop, name="reconserve-watch", daemon=True)
        self._watcher.start()
        self._start_retention()
        if self.probe is not None:
            asyncio.ensure_future(self._probe_workers())

    async def _probe_workers(self) -> None:
        """Ready once a worker replica answers (``/readyz`` says 503 until then)."""
        while not self._stop and not self.workers_ready:
            try:
                await asyncio.wait_for(self.probe(), 10.0)
                self.workers_ready = True
                log.info("a worker replica answered: ready")
            except Exception:  # noqa: BLE001 - none is up yet
                await asyncio.sleep(1.0)

    @property
    def alive(self) -> bool:
        return self._watcher is not None and self._watcher.is_alive()

    def begin_shutdown(self) -> None:
        """Stop admitting and wake every waiter; the workers go on with the jobs they hold."""
        with self._cond:
            self._draining = True
            jobs = list(self._active.values())
        for job in jobs:
            job.notify()

    def _threads(self) -> tuple:
        return self._watcher, self._timer

    def recover(self, rebuild=None) -> int:
        """Hand over the queued jobs no worker holds (after a restart of the whole cluster)."""
        return self._reap()

    # ------------------------------------------------------------------ admission
    def _queued_totals(self) -> tuple[int, float, int]:
        count, cost, nbytes = self.store.queued_totals()
        self._waiting = count
        r = self._reserved
        return count + r["count"], cost + r["cost"], nbytes + r["bytes"]

    def _running_left(self) -> float:
        return sum(j.cost * (1 - j.step / max(1, j.total)) for j in list(self._active.values())
                   if j.status == "running")

    def _accepted(self, job: Job, reservation: Reservation) -> None:
        with self._cond:
            self._release(reservation)
            self._active[job.id] = job
        self._hand_over(job.id)

    # ------------------------------------------------------------------ jobs
    def get(self, job_id: str) -> Job | None:
        """As ``JobsBase.get``; an unfinished job is watched from now on (it may have been
        submitted to another ingress replica)."""
        job = super().get(job_id)
        if job is not None and not job.terminal and job.status != "expired":
            with self._cond:
                job = self._active.setdefault(job.id, job)
        return job

    def cancel(self, job_id: str) -> Job | None:
        """A job no worker holds is cancelled at once; a held one becomes ``cancelling`` and
        its worker stops it at its next lease renewal (``lease_s / 3``) and step."""
        job = self.get(job_id)
        if job is None or job.terminal:
            return job
        if not self.store.cancel_queued(job_id, cancelled_error(), now_iso()):
            self.store.request_cancel(job_id)
        self._refresh([job])
        return job

    # ------------------------------------------------------------------ hand-over
    def _hand_over(self, job_id: str) -> None:
        with self._cond:
            if job_id in self._dispatching or self._draining or self._loop is None:
                return
            self._dispatching.add(job_id)
        asyncio.run_coroutine_threadsafe(self._dispatch(job_id), self._loop)

    async def _dispatch(self, job_id: str) -> None:
        """One hand-over: returns when the worker finished the job or let go of it (shutdown,
        lost lease), or when the call failed (the replica died; its lease then runs out)."""
        try:
            await self.dispatch(job_id)
        except Exception as e:  # noqa: BLE001
            log.warning("job %s: its worker failed (%s); it runs again once its lease expires", job_id,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            with self._cond:
                self._dispatching.discard(job_id)
        rec = await asyncio.to_thread(self.store.get, job_id)
        if rec is not None and rec.status == "queued" and rec.owner is None:  # given back: again, at once
            self._hand_over(job_id)

    def _reap(self) -> int:
        """Release the jobs of workers that stopped renewing their lease, and hand over every
        queued job no worker holds and this ingress has not handed over. Returns the count."""
        for rec in self.store.stale(time.time() - self.settings.lease_s):
            if self.store.release(rec.id, rec.owner, cancelled_error(), now_iso()):
                log.warning("job %s: worker %s stopped renewing its lease; the job runs again", rec.id, rec.owner)
        orphans = self.store.unclaimed()
        with self._cond:
            orphans = [i for i in orphans if i not in self._dispatching]
        for job_id in orphans:
            self._hand_over(job_id)
        return len(orphans)

    # ------------------------------------------------------------------ watching the store
    def _refresh(self, jobs: list[Job]) -> None:
        """Bring ``jobs`` up to date with the store; wake their listeners on a change."""
        rows = self.store.states([j.id for j in jobs])
        for job in jobs:
            rec = rows.get(job.id)
            if rec is None:
                continue
            with job.lock:
                before = (job.status, job.step, job.total)
                job.status, job.step, job.total = rec.status, int(rec.step), int(rec.total)
                job.started_at, job.finished_at, job.error = rec.started_at, rec.finished_at, rec.error
                job.result_meta, job.worker = rec.result, rec.owner
                changed = before != (job.status, job.step, job.total)
            if job.status in TERMINAL or job.status == "expired":
                if job.status == "succeeded" and job.result_meta:  # (one replica's rate: conservative)
                    self._measured(job.cost, float(job.result_meta.get("elapsed_s") or 0.0))
                self._remember(job)
                job.done.set()
                job.notify()
            elif changed:
                job.notify(progress=True)

    def _watch_loop(self) -> None:
        s = self.settings
        next_reap = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=s.poll_s)
                if self._stop:
                    return
                jobs = list(self._active.values())
            try:
                if jobs:
                    self._refresh(jobs)
                if time.monotonic() >= next_reap and not self._draining:
                    next_reap = time.monotonic() + s.lease_s / 3
                    self._reap()
            except Exception:  # noqa: BLE001 - the store may be briefly unreachable; retry next tick
                log.exception("watching the job store failed")
