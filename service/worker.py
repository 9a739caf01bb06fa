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
import threading
import time

import numpy as np
import torch

from guidance.core import DivergedError
from guidance.solve import BatchSolution, ItemSolution, solve_batch

from .job import Job, JobResult, cancelled_error, deadline_error, error_of, now_iso
from .jobs import JobsBase
from .admission import Reservation
from .callbacks import Deliveries
from .lifecycle import Lifecycle
from .metrics import ServiceMetrics
from .stack import job_items, job_outcomes, job_view
from .schemas import TERMINAL
from .store import JobStore, StoredResult

log = logging.getLogger("reconserve.jobs")


class _BatchStopped(Exception):
    """Raised from the callback when no job of the batch is left (all cancelled, expired or
    put back in the queue for a shutdown)."""


class JobManager(Lifecycle, JobsBase):
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
        self.deliveries = Deliveries(settings, store, lambda rec: Job(rec).status_dict(), now_iso,
                                     lambda: self._stop or self._draining)  # callbacks of finished jobs
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.running.set_function(lambda: len(self._running))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = self._draining = False
        self._thread = threading.Thread(target=self._loop, name=f"reconserve-worker-{self.device}", daemon=True)
        self._thread.start()
        self.deliveries.start()
        if self.owner is None:
            self._start_retention()  # (in a cluster the ingress runs retention)
        else:
            self._lease = threading.Thread(target=self._lease_loop, name="reconserve-lease", daemon=True)
            self._lease.start()

    @property
    def alive(self) -> bool:
        """The worker thread runs (``/healthz`` fails otherwise, so the process is restarted)."""
        return self._thread is not None and self._thread.is_alive()


    def _threads(self) -> tuple:
        return self._thread, self._timer, self._lease, self.deliveries.thread

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
            self._finish(job, "cancelled", cancelled_error())
            return job
        with job.lock:  # the worker may finish the job meanwhile: a final status stays, here and stored
            running = not job.terminal
            if running:
                job.status = "cancelling"
        if running:
            self._store("update", job.id, status="cancelling", only_from=("queued", "running"))
            job.notify()
        return job

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
                    step=job.total if status == "succeeded" else job.step)  # (what status and callbacks show)
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
        if job.callback:
            self.deliveries.wake()
        return True


    def _check(self, job: Job) -> str | None:
        """``"stop"`` if ``job`` must leave its batch now (finished as cancelled or expired),
        ``"requeue"`` when shutting down, else None."""
        if self._draining:
            return "requeue"
        if job.cancel_requested:
            self._finish(job, "cancelled", cancelled_error())
            return "stop"
        if time.time() > job.deadline:
            self._finish(job, "failed", deadline_error(self.settings.job_deadline_s))
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

    def _progress(self, active: dict[str, Job]):
        """The sampler's callback for a batch of the ``active`` jobs: progress, and the jobs that
        leave it (``_check``); ``_BatchStopped`` when none is left."""
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
        return callback

    def _run(self, jobs: list[Job], isolate: bool = False) -> list[Job]:
        """Run ``jobs`` as one batch (``guidance.solve.solve_batch``); returns the jobs to rerun
        alone (when ``isolate``)."""
        active = {j.id: j for j in jobs}
        problems = [j.problem for j in jobs]
        p0 = problems[0]
        try:
            with torch.no_grad():  # (a volume's slices are items of their own: service/stack.py)
                run = solve_batch(p0.model, p0.plan, [it for p in problems for it in job_items(p)],
                                  noise_sigma=p0.noise_sigma, pde=p0.pde, device=self.device,
                                  callback=self._progress(active),
                                  chunk=self.settings.slice_chunk if p0.volume is not None else None,
                                  shared_svd=len({p.operator_digest for p in problems}) == 1)
        except _BatchStopped:
            return []
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            left = [j for j in jobs if j.id in active and not j.terminal]
            if isolate and left:  # (a job that left the batch may have been the culprit)
                log.info("batch of %d failed (%s); rerunning each job alone", len(left), e)
                return left
            for job in left:
                self._finish(job, "failed", error_of(e))
            return []
        self._count(jobs, run)
        for job, out in zip(jobs, job_outcomes(problems, run.items)):
            if job.id in active and not job.terminal:
                self._conclude(job, out, run, len(jobs))
        return []

    def _count(self, jobs: list[Job], run: BatchSolution) -> None:
        """A batch ran: the throughput estimate and the metrics."""
        self._measured(sum(j.cost for j in jobs), run.seconds)
        self.metrics.batches.inc()
        self.metrics.nfe.labels(jobs[0].model_id).inc(run.nfe)
        if len(jobs) > 1:
            self.metrics.batched_jobs.inc(len(jobs))
            self.metrics.shared_nfe.inc(run.nfe * (len(jobs) - 1))

    def _conclude(self, job: Job, out: ItemSolution, run: BatchSolution, batched_with: int) -> None:
        """Finish ``job`` with its item of the batch: its result, or the error of its finishing."""
        try:
            if out.error is not None:
                raise out.error
            samples = out.samples.float().cpu().numpy()
            if not np.isfinite(samples).all():
                raise DivergedError("the reconstruction has non-finite values; lower the guidance "
                                    "weight or use more steps")
            view = job_view(job.problem)
        except Exception as e:  # noqa: BLE001
            self._finish(job, "failed", error_of(e))
            return
        self._finish(job, "succeeded", result=JobResult(
            samples, out.metrics, run.nfe, run.seconds, batched_with, job.problem.plan.describe(),
            None if view is None else view.astype(np.float32)))
