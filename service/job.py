"""A job as the service sees it: its state, its waiters, its result, and the errors it ends with.

``JobsError`` and its subclasses are the job layer's refusals (queue full, shutting down,
result expired): each has a ``code`` and a ``message`` and the routers answer them over HTTP
(``service.routers.jobs.http_error``); nothing here knows a status code.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from guidance.core import DivergedError
from guidance.solve import PosteriorStats

from .errors import scrub
from .problem import Problem
from .schemas import TERMINAL
from .store import JobRecord

log = logging.getLogger("reconserve.jobs")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobsError(Exception):
    """A refusal of the job layer: ``code``, ``message`` and, where retrying helps, the seconds
    after which to retry (``retry_after``)."""

    code = "error"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class ResultExpired(JobsError):
    code = "expired"

    def __init__(self):
        super().__init__("the job's result has expired; submit the job again")


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

    @classmethod
    def from_meta(cls, samples: np.ndarray, observation_view, m: dict | None) -> "JobResult":
        """A result read back from the store (``meta()`` and the stored arrays)."""
        m = m or {}
        return cls(samples, m.get("metrics", {}), m.get("nfe", 0), m.get("elapsed_s", 0.0),
                   m.get("batched_with", 1), m.get("method", {}), observation_view)

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
        self.created_ts = record.created_ts  # wall clock (s): the order of GET /v1/jobs
        self.error = record.error
        self.worker = record.owner  # the worker replica that holds it (scale-out), else None
        self.callback = record.callback  # its callback's delivery (service/callbacks.py), else None
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
                    "batched_with": batched, "worker": self.worker,
                    "callback": dict(self.callback) if self.callback else None}


# ----------------------------------------------------------------------------- a job's error
def cancelled_error() -> dict:
    return {"code": "cancelled", "message": "the job was cancelled (DELETE); submit it again for a result"}


def deadline_error(deadline_s: float) -> dict:
    return {"code": "deadline_exceeded",
            "message": f"the job did not finish within {deadline_s:g} s of its submission; send fewer "
                       "steps or samples, or retry when the queue is shorter"}


def unrecoverable_error(e: Exception, where: str) -> dict:
    """A stored job that cannot be rebuilt (its model is gone, say) ``where`` (after a restart,
    on its worker)."""
    msg = scrub(e.message) if isinstance(getattr(e, "message", None), str) else scrub(str(e), 300)
    return {"code": "unrecoverable", "message": f"the job could not be {where}: {msg}"}


def error_of(e: Exception) -> dict:
    """The job's error for an exception of its run."""
    if isinstance(e, DivergedError):
        return {"code": "diverged", "message": str(e)}
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"code": "out_of_memory", "message": "the device ran out of memory; send fewer samples "
                                                    "or retry later"}
    log.exception("job failed", exc_info=e)
    msg = scrub(str(e).splitlines()[0], 300) if str(e) else type(e).__name__
    return {"code": "reconstruction_failed", "message": f"the reconstruction failed: {msg}; "
                                                        "try another method or other parameters"}
