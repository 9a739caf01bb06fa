"""The job queue and the worker: bounded queue, one worker thread per device, batching.

Batching. The worker takes the oldest queued job and, within ``batch_window_ms``, every
queued job *compatible* with it (up to ``max_batch`` jobs and ``max_batch_rows`` samples):
same model, same method with the same resolved configuration (hence the same schedule),
same ``noise_sigma``, same PDE block, and operators of the same kind, observation shape and
structure (linearity, ``A A^T`` constant, channel separability; for projection ALD, which
works in the operator's SVD basis, operators with an SVD must be identical). The jobs' network-space observations are concatenated along the batch,
a ``BatchedOperator`` applies each job's own operator to its slice of the batch, and the
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
import hashlib
import json
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

from guidance.core import DivergedError, SplitGenerator
from guidance.registry import METHODS
from guidance.solve import Plan, PosteriorStats, finish, network_problem
from models.denoiser import CountingDenoiser
from operators.base import Operator

from .errors import ApiError, scrub
from .metrics import ServiceMetrics
from .schemas import TERMINAL

log = logging.getLogger("reconserve.jobs")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def digest(obj: Any) -> str:
    """A stable hash of nested dicts/lists/numbers/strings/numpy arrays."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            h.update(b"A" + a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes())
        elif isinstance(o, torch.Tensor):
            feed(o.detach().cpu().numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                feed(str(k))
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for e in o:
                feed(e)
            h.update(b"]")
        else:
            h.update(b"S" + json.dumps(o, default=repr).encode() + b";")

    feed(obj)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the validated problem
@dataclass
class Problem:
    """Everything a job needs, validated: the model, its operator, observation and plan."""

    model: Any  # models.checkpoint.LoadedModel
    operator: Operator  # physical units
    operator_digest: str
    y: torch.Tensor  # observation, float64, obs_shape, physical units
    noise_sigma: float
    pde: Operator | None  # the requested PDE term (passed to the sampler)
    pde_metric: Operator | None  # the PDE whose residual is reported (requested or the card's)
    pde_digest: str
    plan: Plan
    num_samples: int
    seed: int
    returns: tuple[str, ...]
    svd_available: bool = False
    completion: str = "auto"

    @property
    def model_id(self) -> str:
        return self.model.card["id"]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one sampler run."""
        op = self.operator
        return (self.model_id, json.dumps(self.plan.describe(), sort_keys=True, default=repr),
                float(self.noise_sigma), self.pde_digest, op.kind, tuple(op.obs_shape),
                bool(op.linear), getattr(op, "row_gram", None), bool(op.channel_separable),
                type(op).__name__,
                # projection ALD works in the operator's SVD basis: only identical operators share it
                self.operator_digest if self.svd_available and self.plan.name == "ald" else None)


# ----------------------------------------------------------------------------- batched operator
class Unbatchable(RuntimeError):
    """The sampler needs something a mixed batch cannot give; its jobs run alone instead."""


class BatchedOperator(Operator):
    """Several jobs' operators side by side: job ``j`` owns rows ``counts[:j].sum()`` onward.

    Every method applies each job's operator to its own slice of the batch (so each job sees
    exactly what it would see alone). A batch of one row is broadcast: each operator is
    applied to it and the result repeated over its job's rows (``channel_masks`` probes the
    operator that way). ``svd()`` is the shared SVD when all operators are identical, else None.
    """

    def __init__(self, ops: list[Operator], counts: list[int], shared_svd: bool = False):
        first = ops[0]
        super().__init__(first.in_shape)
        self.ops, self.counts, self.total = ops, list(counts), int(sum(counts))
        self.linear = first.linear  # type: ignore[misc]
        self.kind = first.kind  # type: ignore[misc]
        self.channel_separable = first.channel_separable
        self.row_gram = getattr(first, "row_gram", None)
        self._shared_svd = shared_svd

    @property
    def obs_shape(self):
        return self.ops[0].obs_shape

    def _split(self, arg):
        if isinstance(arg, torch.Tensor) and arg.dim() >= 1 and arg.shape[0] == self.total:
            return list(torch.split(arg, self.counts))
        return [arg] * len(self.ops)

    def _map(self, name: str, x: torch.Tensor, *rest):
        b = x.shape[0]
        if b == 1 and self.total != 1 and not any(
                isinstance(r, torch.Tensor) and r.dim() >= 1 and r.shape[0] == self.total for r in rest):
            outs = [getattr(op, name)(x, *rest) for op in self.ops]
            return torch.cat([o.expand((n,) + tuple(o.shape[1:])) for o, n in zip(outs, self.counts)])
        if b == 1 and self.total != 1:
            x = x.expand((self.total,) + tuple(x.shape[1:]))
        elif b != self.total:
            raise ValueError(f"batched operator got a batch of {b}, expected {self.total} or 1")
        parts = [self._split(a) for a in (x, *rest)]
        return torch.cat([getattr(op, name)(*(p[i] for p in parts)) for i, op in enumerate(self.ops)])

    def forward(self, x):
        return self._map("forward", x)

    __call__ = forward

    def adjoint(self, y):
        return self._map("adjoint", y)

    def normal(self, x):
        return self._map("normal", x)

    def pseudo_inverse(self, y):
        return self._map("pseudo_inverse", y)

    def project(self, x, y):
        return self._map("project", x, y)

    def prox(self, z, y, rho):
        return self._map("prox", z, y, rho)

    def residual(self, x):
        return self._map("residual", x)

    def svd(self):
        if self._shared_svd:
            return self.ops[0].svd()
        if all(op.svd() is None for op in self.ops):
            return None
        # different operators with their own SVDs: no one basis serves the batch
        raise Unbatchable("the batch's operators have different SVDs")


def run_batch(problems: list[Problem], device: str | torch.device = "cpu",
              callback: Callable[[dict], None] | None = None):
    """One sampler run for compatible problems. Returns ``(per-problem physical samples
    [K_j, C, H, W] float64, network calls, seconds)``; the same as ``guidance.solve.solve`` for
    each problem alone."""
    p0 = problems[0]
    model, plan = p0.model, p0.plan
    ops, ys, pde_net = [], [], None
    for i, p in enumerate(problems):
        y = p.y.to(device=device, dtype=torch.float64)
        op, y_net, pde_j = network_problem(model, p.operator, y[None], p.pde)
        ops.append(op)
        ys.append(y_net.expand((p.num_samples,) + tuple(y_net.shape[1:])))
        if i == 0:
            pde_net = pde_j
    counts = [p.num_samples for p in problems]
    operator = ops[0] if len(problems) == 1 else BatchedOperator(
        ops, counts, shared_svd=len({p.operator_digest for p in problems}) == 1)
    y_all = torch.cat(ys).clone()
    den = CountingDenoiser(model.denoiser)
    gen = SplitGenerator([(torch.Generator(device="cpu").manual_seed(int(p.seed)), p.num_samples)
                          for p in problems])
    t0 = time.perf_counter()
    x = METHODS[plan.name].sampler(den, operator, y_all, plan.sigmas.to(device), config=plan.config,
                                   generator=gen, callback=callback, noise_sigma=float(p0.noise_sigma),
                                   pde=pde_net)
    elapsed = time.perf_counter() - t0
    x_phys = ops[0].to_physical(x.detach())
    return list(torch.split(x_phys, counts)), den.nfe, elapsed


def finish_problem(p: Problem, x_phys: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``guidance.solve.finish`` (completion, metrics of the mean), non-finite metrics as None."""
    x_phys, metrics = finish(p.model, p.operator, p.y, x_phys, p.pde_metric, p.completion)
    return x_phys, {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- jobs
@dataclass
class JobResult(PosteriorStats):
    samples: np.ndarray  # [K, C, H, W] float32, physical units
    metrics: dict
    nfe: int
    elapsed_s: float
    batched_with: int
    method: dict
    _encoded: dict = field(default_factory=dict)


class Job:
    def __init__(self, problem: Problem, deadline_s: float):
        self.id = uuid.uuid4().hex
        self.problem = problem
        self.status = "queued"
        self.step, self.total = 0, int(problem.plan.config.steps)
        self.created_at, self.started_at, self.finished_at = now_iso(), None, None
        self.created_mono = time.monotonic()
        self.started_mono: float | None = None
        self.finished_mono: float | None = None
        self.deadline = self.created_mono + deadline_s
        self.error: dict | None = None
        self.result: JobResult | None = None
        self.cancel_requested = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._listeners: set = set()
        self._last_progress = 0.0

    # -- notification of async waiters (SSE, synchronous reconstruct)
    #: Progress wake-ups per listener are at most this frequent: waking an event loop on every
    #: step makes it fight the worker for the GIL (steps of a few ms would take ten times longer).
    PROGRESS_INTERVAL_S = 0.1

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

    def _notify(self, progress: bool = False) -> None:
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
            p = self.problem
            return {"id": self.id, "status": self.status,
                    "progress": {"step": self.step, "total": self.total},
                    "created_at": self.created_at, "started_at": self.started_at,
                    "finished_at": self.finished_at, "error": dict(self.error) if self.error else None,
                    "model": p.model_id, "method": p.plan.name, "num_samples": p.num_samples,
                    "batched_with": self.result.batched_with if self.result else None}


class QueueFull(ApiError):
    pass


class _BatchStopped(Exception):
    """Raised from the callback when no job of the batch is left (all cancelled/expired)."""


class JobManager:
    """Bounded queue plus one worker thread (for one device) that batches compatible jobs."""

    def __init__(self, settings, metrics: ServiceMetrics | None = None):
        self.settings = settings
        self.device = settings.device
        self.metrics = metrics or ServiceMetrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._running: list[Job] = []
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.running.set_function(lambda: len(self._running))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"reconserve-worker-{self.device}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self._finish(job, "cancelled", {"code": "shutting_down",
                                            "message": "the server shut down before the job ran; submit it again"})
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def pause(self) -> None:
        """Stop taking jobs from the queue (the running batch goes on)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ jobs
    def submit(self, problem: Problem) -> Job:
        job = Job(problem, self.settings.job_deadline_s)
        with self._cond:
            if self._stop:
                raise ApiError(503, "not_ready", "the server is shutting down; retry in a moment")
            if len(self._queue) >= self.settings.queue_size:
                self.metrics.rejected.inc()
                raise QueueFull(429, "queue_full",
                                f"the queue is full ({self.settings.queue_size} jobs waiting); "
                                f"retry after {self.settings.retry_after_s} s",
                                headers={"Retry-After": str(self.settings.retry_after_s)})
            self._evict()
            self._jobs[job.id] = job
            self._queue.append(job)
            self.metrics.submitted.inc()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            job.cancel_requested = True
        if queued:
            self._finish(job, "cancelled", _cancelled_error())
        return job

    def queue_depth(self) -> int:
        return len(self._queue)

    def _evict(self) -> None:
        """Forget finished jobs past their time to live, then the oldest finished ones while
        there are more than ``max_jobs_kept`` jobs or their results exceed ``max_result_bytes``
        (lock held)."""
        now = time.monotonic()
        ttl, cap = self.settings.result_ttl_s, self.settings.max_jobs_kept
        finished = [j for j in self._jobs.values() if j.terminal]
        for j in finished:
            if now - (j.finished_mono or now) > ttl:
                self._jobs.pop(j.id, None)
        finished = [j for j in finished if j.id in self._jobs]
        size = sum(j.result.samples.nbytes for j in finished if j.result is not None)
        count = len(self._jobs)
        for j in finished:
            if count < cap and size <= self.settings.max_result_bytes:
                break
            self._jobs.pop(j.id)
            count -= 1
            size -= j.result.samples.nbytes if j.result is not None else 0

    # ------------------------------------------------------------------ state changes
    def _finish(self, job: Job, status: str, error: dict | None = None, result: JobResult | None = None):
        with job.lock:
            if job.status in TERMINAL:
                return False
            job.status, job.error, job.result = status, error, result
            job.finished_at, job.finished_mono = now_iso(), time.monotonic()
            if status == "succeeded":
                job.step = job.total
        if job.problem.operator.kind == "compressed_sensing":
            # its matrix may be hundreds of MB: not kept with the finished job (result.png then
            # leaves the observation panel blank)
            job.problem.operator = None
        self.metrics.finished.labels(status).inc()
        if job.started_mono is not None:
            self.metrics.duration.labels(job.problem.model_id, job.problem.plan.name).observe(
                job.finished_mono - job.started_mono)
        job.done.set()
        job._notify()
        return True

    def _expire_or_cancel(self, job: Job) -> bool:
        """Finish ``job`` if it was cancelled or is past its deadline; True if it did."""
        if self._stop:
            return self._finish(job, "cancelled", {"code": "shutting_down",
                                                   "message": "the server shut down; submit the job again"}) or True
        if job.cancel_requested:
            return self._finish(job, "cancelled", _cancelled_error()) or True
        if time.monotonic() > job.deadline:
            return self._finish(job, "failed", {
                "code": "deadline_exceeded",
                "message": f"the job did not finish within {self.settings.job_deadline_s:g} s of its "
                           "submission; send fewer steps or samples, or retry when the queue is shorter"}) or True
        return False

    # ------------------------------------------------------------------ worker
    def _gather(self, batch: list[Job]) -> None:
        """Move queued jobs compatible with ``batch[0]`` into ``batch`` (lock held)."""
        key = batch[0].problem.batch_key()
        rows = sum(j.problem.num_samples for j in batch)
        for job in list(self._queue):
            if len(batch) >= self.settings.max_batch:
                break
            n = job.problem.num_samples
            if rows + n > self.settings.max_batch_rows or job.cancel_requested:
                continue
            if job.problem.batch_key() == key:
                self._queue.remove(job)
                batch.append(job)
                rows += n

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._stop and (self._paused or not self._queue):
                self._cond.wait()
            if self._stop:
                return None
            batch = [self._queue.popleft()]
            if self.settings.max_batch > 1:
                self._gather(batch)
                end = time.monotonic() + self.settings.batch_window_ms / 1000.0
                while len(batch) < self.settings.max_batch and not self._stop:
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
            batch = self._take()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # never let the worker die
                log.exception("worker: unexpected error")
                for job in batch:
                    self._finish(job, "failed", {"code": "reconstruction_failed",
                                                 "message": "the reconstruction failed unexpectedly; "
                                                            "try other method parameters"})
            finally:
                self._running = []

    def _execute(self, batch: list[Job]) -> None:
        live = [j for j in batch if not self._expire_or_cancel(j)]
        if not live:
            return
        for job in live:
            with job.lock:
                job.status, job.started_at, job.started_mono = "running", now_iso(), time.monotonic()
                job.step = 0
            job._notify()
        if len(live) == 1:
            self._run(live)
            return
        failed = self._run(live, isolate=True)
        for job in failed:  # a batch failed: rerun each job alone so only the culprit fails
            if not self._expire_or_cancel(job):
                with job.lock:
                    job.step = 0
                self._run([job])

    def _run(self, jobs: list[Job], isolate: bool = False) -> list[Job]:
        """Run ``jobs`` as one batch; returns the jobs to rerun alone (when ``isolate``)."""
        active = {j.id: j for j in jobs}

        def callback(info: dict) -> None:
            step, total = int(info["i"]) + 1, int(info["total"])
            for job in list(active.values()):
                if self._expire_or_cancel(job):
                    del active[job.id]
                    continue
                with job.lock:
                    job.step, job.total = step, total
                job._notify(progress=True)
            if not active:
                raise _BatchStopped()

        problems = [j.problem for j in jobs]
        try:
            with torch.no_grad():
                xs, nfe, elapsed = run_batch(problems, self.device, callback)
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
            except Exception as e:  # noqa: BLE001
                self._finish(job, "failed", _error_of(e))
                continue
            self._finish(job, "succeeded", result=JobResult(
                samples, metrics, nfe, elapsed, len(jobs), job.problem.plan.describe()))
        return []


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
