"""Admission: room in the queue, bounded by count, cost and bytes, and ``Retry-After``.

A request reserves room (``Admission.reserve``) before any costly preparation; the reservation
is released when its job is queued or refused. A refusal is a ``QueueFull`` (with the seconds
until the work ahead has run, at the measured throughput) or ``ShuttingDown``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .job import JobsError

#: Throughput assumed (pixel-evaluations per second) until a batch has been measured.
INITIAL_THROUGHPUT = 2e5


class QueueFull(JobsError):
    code = "queue_full"


class ShuttingDown(JobsError):
    code = "shutting_down"

    def __init__(self):
        super().__init__("the server is shutting down; queued jobs resume when it restarts; retry in a "
                         "few seconds", retry_after=5)


@dataclass
class Reservation:
    """Room in the queue, held from admission until the job is queued (or refused)."""

    cost: float
    nbytes: int
    held: bool = True


class Admission:
    """Reservations and the throughput estimate; mixed into ``service.jobs.JobsBase``, whose
    subclasses say what waits (``_queued_totals``) and what runs (``_running_left``). Uses the
    host's ``settings``, ``metrics``, ``_cond``, ``_draining``."""

    def _init_admission(self) -> None:
        self._reserved = {"count": 0, "cost": 0.0, "bytes": 0}
        self._throughput: float | None = None

    def _measured(self, cost: float, elapsed: float) -> None:
        """A batch of ``cost`` ran in ``elapsed`` s: the throughput behind ``Retry-After``."""
        if elapsed > 0:
            rate = cost / elapsed
            self._throughput = rate if self._throughput is None else 0.7 * self._throughput + 0.3 * rate

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

    def _refusal(self, cost: float, nbytes: int) -> QueueFull | None:
        """Why a job of ``cost`` holding ``nbytes`` does not fit now (lock held), or None."""
        s = self.settings
        count, queued_cost, queued_bytes = self._queued_totals()
        if count >= s.queue_size:
            why, wait = f"the queue is full ({s.queue_size} jobs waiting)", self._running_left()
        elif count and queued_cost + cost > s.max_queued_cost:
            why = f"the queue holds {queued_cost:.3g} of {s.max_queued_cost:.3g} pixel-evaluations of work"
            wait = self._running_left() + queued_cost + cost - s.max_queued_cost
        elif count and queued_bytes + nbytes > s.max_queued_bytes:
            why = f"the queued requests hold {queued_bytes} of {s.max_queued_bytes} bytes"
            wait = self._running_left() + self._first_waiting_cost()
        else:
            return None
        after = self.retry_after(wait)
        return QueueFull(f"{why}; retry after {after} s", retry_after=after)

    def reserve(self, cost: float, nbytes: int) -> Reservation:
        """Room for a job of ``cost`` holding ``nbytes``, or ``QueueFull`` (with the seconds until
        the work ahead has run) / ``ShuttingDown``. Cheap: call it before any costly preparation."""
        with self._cond:
            if self._draining:
                raise ShuttingDown()
            refused = self._refusal(cost, nbytes)
            if refused is not None:
                self.metrics.rejected.inc()
                raise refused
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
