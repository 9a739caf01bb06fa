"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class ServiceMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.queue_depth = Gauge("reconserve_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running = Gauge("reconserve_jobs_running", "Jobs being reconstructed now", registry=r)
        self.duration = Histogram("reconserve_job_duration_seconds",
                                  "Time from start to finish of succeeded jobs",
                                  ["model", "method"], buckets=DURATION_BUCKETS, registry=r)
        self.finished = Counter("reconserve_jobs_finished_total", "Jobs by final status",
                                ["status"], registry=r)
        self.submitted = Counter("reconserve_jobs_submitted_total", "Jobs accepted into the queue",
                                 registry=r)
        self.rejected = Counter("reconserve_jobs_rejected_total", "Jobs refused because the queue was full",
                                registry=r)
        self.nfe = Counter("reconserve_network_evaluations_total",
                           "Network (denoiser) calls; a batched call counts once", ["model"], registry=r)
        self.batches = Counter("reconserve_batches_total", "Sampler runs (one batch each)", registry=r)
        self.batched_jobs = Counter("reconserve_batched_jobs_total",
                                    "Jobs that ran in a batch with other jobs", registry=r)
        self.shared_nfe = Counter("reconserve_shared_network_evaluations_total",
                                  "Network calls saved by batching (job-evaluations minus calls made)",
                                  registry=r)
        self.requests = Counter("reconserve_http_requests_total",
                                "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.gpu_memory = Gauge("reconserve_gpu_memory_bytes", "CUDA memory allocated by torch",
                                ["device"], registry=r)

    def render(self, device: str | None = None) -> bytes:
        if device and device.startswith("cuda"):
            try:
                import torch
                if torch.cuda.is_available():
                    self.gpu_memory.labels(device).set(torch.cuda.memory_allocated(device))
            except Exception:  # pragma: no cover - metrics must never fail a scrape
                pass
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: every answered HTTP request counted by its route's template (``/v1/jobs/{job_id}``,
    never the id itself; ``unmatched`` for unknown paths), method and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)
        try:
            await self.app(scope, receive, counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0] if status else 500)).inc()
