"""The service on Ray Serve: ``reconserve serve --ray``, or ``serve run deploy/serve.yaml``.

Two deployments (``service/cluster.py`` explains how jobs move between them):

- ``Ingress``: the same FastAPI app and HTTP contract as one host, jobs kept by
  ``ClusterJobs`` (admission with ``429`` + ``Retry-After`` against the jobs queued in the
  shared store, progress and results read from the store). No GPU; the models' cards and
  weights are loaded on its CPU for validation only.
- ``Worker``: holds the models on its device (``ray_num_gpus`` per replica), claims the jobs
  handed to it and runs them with the single-host ``JobManager`` (compatible jobs share one
  batch: a replica takes up to ``ray_jobs_per_worker`` at once). Autoscaled between
  ``ray_min_workers`` and ``ray_max_workers`` replicas on the jobs each holds.

Every replica reads its settings from the ``RECONSERVE_*`` variables of its environment, with
the ``overrides`` given to ``build_app`` on top. The job store must be shared: PostgreSQL for
the rows (``RECONSERVE_DATABASE_URL``) and one folder for the array files
(``RECONSERVE_DATA_DIR``, a shared volume on a multi-host cluster).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from ray import serve

from .settings import Settings

log = logging.getLogger("reconserve.ray")


def replica_settings(overrides: dict[str, Any], **more) -> Settings:
    settings = Settings(**{**overrides, **more})
    if settings.torch_threads:
        import torch
        torch.set_num_threads(settings.torch_threads)
    return settings


class Worker:
    """A worker replica: the models on its device, and the jobs it claims (``run``)."""

    def __init__(self, overrides: dict[str, Any]):
        from .deps import State
        from .worker import JobManager

        settings = replica_settings(overrides)
        replica = serve.get_replica_context().replica_id.unique_id
        #: who holds a job (its status's ``worker``): the replica, its host and process
        self.owner = f"{replica}@{socket.gethostname()}:{os.getpid()}"
        self.state = State(settings, None, lambda s, store, m: JobManager(s, store, m, owner=self.owner))
        self.state.jobs.start()
        self.state.load()
        if self.state.load_error:
            raise RuntimeError(self.state.load_error)
        log.info("worker %s ready on %s with models %s", self.owner, settings.device, sorted(self.state.models))

    async def run(self, job_id: str) -> dict:
        """Claim the job and run it here (batched with compatible ones); returns when it is
        finished, or given back (this replica is shutting down, or lost the job's lease)."""
        jobs = self.state.jobs
        job = await asyncio.to_thread(jobs.claim, job_id, self.state.rebuild)
        if job is None:
            return {"id": job_id, "claimed": False}
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        job.subscribe(loop, event, progress=False)
        try:
            while not job.done.is_set():
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            job.unsubscribe(loop, event, progress=False)
        return {"id": job_id, "claimed": True, "status": job.status, "worker": self.owner}

    def ping(self) -> dict:
        """The ingress's readiness probe."""
        return {"worker": self.owner}

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose worker thread died."""
        if not self.state.jobs.alive:
            raise RuntimeError("the worker thread is not running")

    def __del__(self):
        """Shutting down (scale-in, redeploy): give back what is not finished, at once."""
        state = getattr(self, "state", None)
        if state is not None:
            state.begin_shutdown()
            state.jobs.stop(timeout=5.0)


@serve.ingress()
class Ingress:
    """The HTTP ingress: the FastAPI app, with jobs handed to the ``Worker`` deployment."""

    def __init__(self, worker, overrides: dict[str, Any]):
        self.worker = worker
        # the ingress runs no job: its models stay on the CPU, for validation only
        self.settings = replica_settings(overrides, device="cpu")

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .cluster import ClusterJobs

        return create_app(self.settings, make_jobs=lambda s, store, m: ClusterJobs(s, store, m, self.dispatch,
                                                                                   self.ping))

    async def dispatch(self, job_id: str) -> dict:
        return await self.worker.run.remote(job_id)

    async def ping(self) -> dict:
        return await self.worker.ping.remote()


def num_gpus(settings: Settings) -> float:
    """GPUs per worker replica: the setting, else 1 where the Ray cluster has GPUs."""
    if settings.ray_num_gpus is not None:
        return settings.ray_num_gpus
    import ray
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(overrides: dict[str, Any] | None = None):
    """The Serve application. ``overrides``: settings (field name -> JSON value) given to every
    replica on top of its ``RECONSERVE_*`` environment."""
    overrides = dict(overrides or {})
    s = Settings(**overrides)
    scaling: dict[str, Any]
    if s.ray_min_workers == s.ray_max_workers:
        scaling = {"num_replicas": s.ray_max_workers}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": s.ray_min_workers, "max_replicas": s.ray_max_workers,
            # scale out when replicas hold more than half their batching pool on average
            "target_ongoing_requests": max(1, s.ray_jobs_per_worker // 2)}}
    worker = serve.deployment(
        Worker, name="Worker", max_ongoing_requests=s.ray_jobs_per_worker,
        ray_actor_options={"num_cpus": s.ray_num_cpus, "num_gpus": num_gpus(s)},
        health_check_period_s=10, graceful_shutdown_timeout_s=10, **scaling)
    ingress = serve.deployment(
        Ingress, name="Ingress", ray_actor_options={"num_cpus": 0},
        # every open SSE stream and waiting /v1/reconstruct is an ongoing request
        max_ongoing_requests=s.max_connections or 1000)
    return ingress.bind(worker.bind(overrides), overrides)


def app_builder(args: dict[str, Any]):
    """For ``serve run`` / ``serve deploy`` config files (``import_path:
    service.ray_serve:app_builder``): ``args`` are settings overrides."""
    return build_app(args)


def serve_ray(host: str, port: int, overrides: dict[str, Any], address: str | None = None,
              num_cpus: int | None = None) -> None:
    """Join (or start) a Ray cluster, run the app on ``host:port`` and block until Ctrl-C."""
    import signal
    import time

    import ray

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    address = address or Settings(**overrides).ray_address
    # every replica reads the same RECONSERVE_* settings as this process
    env = {k: v for k, v in os.environ.items() if k.startswith("RECONSERVE_")}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        serve.run(build_app(overrides), name="reconserve", route_prefix="/")
        log.info("reconserve on Ray Serve at http://%s:%d (Ctrl-C stops it)", host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
