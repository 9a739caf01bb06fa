"""What the routers share: the app's ``State`` and the dependencies that read it (API key,
readiness, a job by id)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from guidance.registry import METHODS
from models.checkpoint import load_models
from models.denoiser import NetworkOptions, configure_network
from operators.spec import OPERATORS

from . import schemas
from .errors import ApiError, scrub
from .admission import ShuttingDown
from .job import Job
from .worker import JobManager
from .metrics import ServiceMetrics
from .prepare import prepare
from .settings import Settings
from .store import JobRecord, JobStore

log = logging.getLogger("reconserve.app")


class State:
    """One app's (or worker replica's) settings, models, job store and job manager."""

    def __init__(self, settings: Settings, models: dict | None, make_jobs=JobManager):
        """``make_jobs(settings, store, metrics)``: the job manager (``JobManager`` runs the jobs
        in this process; a cluster's ingress and workers pass their own, ``service/ray_serve.py``)."""
        self.settings = settings
        self.models = models
        self.load_error: str | None = None
        self.skipped_models: dict[str, str] = {}  # checkpoint folders that failed to load -> why
        self.recovered = False
        self.shutting_down = False
        self.metrics = ServiceMetrics()
        self.store = JobStore(settings.data_dir, settings.database_url)
        self.jobs = make_jobs(settings, self.store, self.metrics)
        self.request_model = schemas.make_request_model(list(OPERATORS), list(METHODS))
        self._large_bodies: asyncio.Semaphore | None = None

    @property
    def ready(self) -> bool:
        return (self.models is not None and self.recovered and self.jobs.alive and not self.shutting_down
                and getattr(self.jobs, "workers_ready", True))

    @property
    def large_bodies(self) -> asyncio.Semaphore:
        """Bounds the large bodies read and parsed at once (created on the server's loop)."""
        if self._large_bodies is None:
            self._large_bodies = asyncio.Semaphore(self.settings.max_large_bodies)
        return self._large_bodies

    def load(self) -> None:
        """Load the models (unless given), then queue again the jobs a previous process left."""
        try:
            if self.models is None:
                extra = [self.settings.models_dir] if self.settings.models_dir else []
                self.models = load_models(self.settings.checkpoints_dir, *extra, device=self.settings.device,
                                          skipped=self.skipped_models)
                log.info("loaded models: %s", sorted(self.models))
                for folder, why in self.skipped_models.items():  # one bad folder never blocks the others
                    log.error("model folder %s not served: %s", folder, why)
            s = self.settings
            options = NetworkOptions(autocast=s.autocast, channels_last=s.channels_last,
                                     compile=(True if s.compile == "default" else s.compile) or False)
            for model in self.models.values():
                configure_network(model.denoiser, options)
            self.jobs.recover(self.rebuild)
            self.recovered = True
        except Exception as e:  # noqa: BLE001 - stay alive, /readyz tells
            log.exception("starting failed")
            self.load_error = scrub(f"starting failed: {e}")

    def rebuild(self, record: JobRecord, files: dict):
        """The problem of a stored job, built again from its stored request."""
        return prepare(record.request, self.request_model, self.models, self.settings, files)

    def begin_shutdown(self) -> None:
        """SIGTERM: stop admitting, interrupt the running batch (its jobs stay queued in the
        store), wake every waiter and event stream so each can answer before the exit."""
        if not self.shutting_down:
            log.info("shutting down: admission stopped, the running batch goes back to the queue")
        self.shutting_down = True
        self.jobs.begin_shutdown()


def get_state(request: Request) -> State:
    return request.app.state.reconserve


def presented_key(request: Request) -> str | None:
    """The API key a request carries (``X-API-Key`` or ``Authorization: Bearer``), if any."""
    key = request.headers.get("x-api-key")
    if key is None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
    return key


def caller_of(request: Request, settings) -> str | None:
    """Who is calling: a digest of the API key (never the key itself); None when the server
    takes no keys (one caller)."""
    key = presented_key(request)
    if not settings.api_keys or not key:
        return None
    return hashlib.sha256(b"reconserve-caller\0" + key.encode("utf-8", "replace")).hexdigest()[:32]


async def require_key(request: Request, state: State = Depends(get_state)) -> None:
    keys = state.settings.api_keys
    if not keys:
        return
    key = presented_key(request)
    ok = False
    if key:
        given = key.encode("utf-8", "replace")
        for k in keys:  # compare with every key: no early exit
            ok |= hmac.compare_digest(given, k.encode("utf-8"))
    if not ok:
        raise ApiError(401, "unauthorized", "a valid API key is required; send the header "
                       "X-API-Key: <key> or Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"})


async def require_ready(state: State = Depends(get_state)) -> None:
    if state.shutting_down:
        raise ShuttingDown()
    if not state.ready:
        raise ApiError(503, "not_ready", state.load_error or
                       "the service is starting (loading models); retry in a few seconds",
                       headers={"Retry-After": "5"})


async def get_job(job_id: str, state: State = Depends(get_state)) -> Job:
    """The job by id: ``404`` if the store never saw it, ``410`` if it is past retention."""
    job = await run_in_threadpool(state.jobs.get, job_id)
    if job is None:
        raise ApiError(404, "unknown_job", "no job with this id; send an id returned by POST /v1/jobs")
    if job.status == "expired":
        s = state.settings
        raise ApiError(410, "expired", f"the job finished more than {s.result_ttl_s:g} s ago (or was among "
                       f"the oldest beyond {s.max_jobs_kept} jobs or {s.max_result_bytes} bytes kept) and its "
                       "result was deleted; submit it again")
    return job


AUTH = [Depends(require_key)]
READY = [Depends(require_key), Depends(require_ready)]
