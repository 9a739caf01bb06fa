"""Service settings, read from the environment (prefix ``RECONSERVE_``) by pydantic-settings.

``RECONSERVE_API_KEYS=key1,key2`` turns authentication on; ``RECONSERVE_DEVICE=cuda`` runs the
worker on the GPU; ``RECONSERVE_MODELS_DIR`` adds a folder of checkpoints to the built-in ones.

Paths work from a git checkout and from an installed wheel alike:

* ``RECONSERVE_DATA_DIR``, the job store: default ``var/`` of the checkout when the code runs from
  one (``pyproject.toml`` beside ``service/``), else the per-user data folder
  ``$XDG_DATA_HOME/reconserve`` (``~/.local/share/reconserve`` when that variable is unset);
* ``RECONSERVE_CHECKPOINTS_DIR``, the embedded priors: default those the wheel ships as package
  data (``models/checkpoints/``), else ``checkpoints/`` of the checkout
  (``models.checkpoint.default_checkpoint_dir``);
* the request examples shown on ``/docs`` (:func:`examples_dir`): those the wheel ships
  (``service/examples/``), else ``docs/examples/`` of the checkout.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def checkout_root() -> Path | None:
    """The source tree this code runs from (``pyproject.toml`` beside ``service/``), or None in
    an installed wheel (``service/`` in site-packages)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def default_data_dir() -> Path:
    """``var/`` of the checkout, else ``$XDG_DATA_HOME/reconserve`` (``~/.local/share/reconserve``;
    a relative ``XDG_DATA_HOME`` is ignored, as the XDG base directory specification asks)."""
    root = checkout_root()
    if root is not None:
        return root / "var"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "reconserve"


def _embedded_checkpoints() -> Path:
    from models.checkpoint import default_checkpoint_dir  # imports torch: only when Settings are read
    return default_checkpoint_dir()


def examples_dir() -> Path:
    """The request examples shown on ``/docs``: ``service/examples/`` where a wheel ships them
    (``setup.py``), else ``docs/examples/`` of the checkout (written by its make_examples.py)."""
    shipped = Path(resources.files(__package__)) / "examples"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[1] / "docs" / "examples"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECONSERVE_", extra="ignore", frozen=True)

    #: Torch device of the worker ("cpu", "cuda", "cuda:1"); "auto": CUDA when torch sees a GPU,
    #: else the CPU (resolved when the settings are read; the server logs which at start).
    device: str = "auto"
    #: The embedded checkpoints (``<id>/card.json`` + weights), always served: default the
    #: wheel's, else ``checkpoints/`` of the checkout (see the module's docstring).
    checkpoints_dir: Path = Field(default_factory=_embedded_checkpoints)
    #: A folder of checkpoints (``<id>/card.json`` + weights) served beside the embedded ones.
    models_dir: Path | None = None
    #: The durable job store: its SQLite database and every job's request and result files
    #: (created on start). Default: ``var/`` of the checkout, else the per-user data folder.
    data_dir: Path = Field(default_factory=default_data_dir)
    #: A SQLAlchemy URL for the job store's database instead of SQLite in ``data_dir`` (e.g.
    #: ``postgresql+psycopg://user@host/reconserve``); array files stay in ``data_dir``.
    database_url: str | None = None
    #: How the networks run (``models.denoiser.NetworkOptions``; CUDA only): autocast "bf16" or
    #: "fp16" (None: full float32), channels_last memory order, torch.compile (a mode name, or
    #: "default"; None: off). Off by default: each changes results within float rounding.
    autocast: Literal["bf16", "fp16"] | None = None
    channels_last: bool = False
    compile: str | None = None
    #: Torch CPU threads for the process (None: torch's default, one per core). The worker runs
    #: one batch at a time beside the event loop; on a shared CPU one intra-op thread is often
    #: ten times faster than several spinning ones (measured on 2 busy cores), so 1 is the
    #: default; raise it on a dedicated many-core CPU host.
    torch_threads: int | None = Field(1, ge=1)
    #: Accepted API keys (comma-separated in the environment); empty: authentication off.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    #: Jobs waiting in the queue (not counting the running batch) before ``429``.
    queue_size: int = Field(64, ge=1)
    #: The queue is also bounded by estimated cost, in units of one network evaluation of one
    #: pixel (network calls + 2 x backprops, x samples x pixels), and by the bytes its
    #: requests hold. A single job over ``max_job_cost`` is refused (422).
    max_queued_cost: float = Field(4e9, gt=0)
    max_job_cost: float = Field(1e9, gt=0)
    max_queued_bytes: int = Field(1024**3, ge=1)
    #: Requests prepared at once (decoding arrays, building operators); others wait their turn.
    max_preparations: int = Field(2, ge=1)
    #: Bodies over 1 MiB read and parsed at once; others wait their turn.
    max_large_bodies: int = Field(2, ge=1)
    #: A body must arrive within this many seconds of its headers (``408`` otherwise).
    body_timeout_s: float = Field(60.0, gt=0)
    #: Largest request body (bytes) before ``413``.
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    #: Largest array (elements) in a request before ``413``.
    max_array_elements: int = Field(2**24, ge=1)
    #: Largest ``method.steps``.
    max_steps: int = Field(5000, ge=1)
    #: Largest number of network evaluations a request may plan for (steps x evaluations per
    #: step, plus corrector steps).
    max_nfe: int = Field(20000, ge=1)
    #: Largest ``num_samples``.
    max_samples: int = Field(64, ge=1)
    #: A job fails with ``deadline_exceeded`` this long after it was submitted.
    job_deadline_s: float = Field(3600.0, gt=0)
    #: How long the worker waits for compatible jobs to join a batch.
    batch_window_ms: float = Field(20.0, ge=0)
    #: Most jobs in one batch (1 turns batching off).
    max_batch: int = Field(16, ge=1)
    #: Most rows (posterior samples over all jobs) in one batch.
    max_batch_rows: int = Field(64, ge=1)
    #: Most rows (slices x samples) per network call: a volume goes through the network in
    #: chunks of this many, so memory is bounded whatever its depth (``guidance.chunked``).
    slice_chunk: int = Field(16, ge=1)
    #: Finished jobs (and their results) are kept this long, and at most this many holding at
    #: most this many bytes on disk (request and result files); then they answer ``410``.
    result_ttl_s: float = Field(3600.0, gt=0)
    max_jobs_kept: int = Field(1000, ge=1)
    max_result_bytes: int = Field(2 * 1024**3, ge=0)
    #: How often retention runs (seconds).
    retention_interval_s: float = Field(30.0, gt=0)
    #: A running job's progress is written to the store at most this often (seconds); in a
    #: cluster the ingress reports progress from the store.
    progress_persist_s: float = Field(2.0, gt=0)
    #: Scale-out (``reconserve serve --ray``, ``service/cluster.py``). A worker replica renews its
    #: lease on the jobs it holds every ``lease_s / 3`` s; a job whose lease is older than
    #: ``lease_s`` is given to another replica. The ingress reads job states every ``poll_s``.
    lease_s: float = Field(15.0, gt=0)
    poll_s: float = Field(0.25, gt=0)
    #: Worker replicas (autoscaled between min and max on the jobs each holds), the GPUs and
    #: CPUs each reserves (``ray_num_gpus`` None: 1 where the cluster has GPUs, else 0), and the
    #: jobs one replica holds at once (its batching pool).
    ray_min_workers: int = Field(1, ge=0)
    ray_max_workers: int = Field(4, ge=1)
    ray_num_gpus: float | None = Field(None, ge=0)
    ray_num_cpus: float = Field(1.0, ge=0)
    ray_jobs_per_worker: int = Field(16, ge=1)
    #: The Ray cluster to join (``ray.init(address=...)``; None: a running local cluster if any,
    #: else a new one on this machine).
    ray_address: str | None = None
    #: Seconds a client has to send a request line and headers, counted from the connection's
    #: opening or from the first byte of a later request on it; then ``408`` and the connection
    #: is closed (slow-loris protection, ``service/protocols.py``).
    header_timeout_s: float = Field(10.0, gt=0)
    #: Open connections (and running requests) before ``503`` with ``Retry-After`` (uvicorn's
    #: ``limit_concurrency``); None: no limit.
    max_connections: int | None = Field(1000, ge=1)
    #: An idle keep-alive connection is closed after this many seconds.
    keep_alive_s: float = Field(5.0, gt=0)
    #: Callbacks (``service/callbacks.py``): the HMAC key of ``X-Reconserve-Signature`` (None: a
    #: random secret kept in ``<data_dir>/callback_secret``, mode 0600, made at the first start);
    #: loopback, private and link-local targets allowed; attempts per delivery, the wait after the
    #: first failed one (doubling after each), and each attempt's connect/send/answer timeout.
    callback_secret: SecretStr | None = None
    callback_allow_private: bool = False
    callback_attempts: int = Field(10, ge=1, le=100)
    callback_base_delay_s: float = Field(2.0, gt=0)
    callback_timeout_s: float = Field(5.0, gt=0, le=120)

    @field_validator("device")
    @classmethod
    def _resolve_device(cls, v: str) -> str:
        if v.strip().lower() == "auto":
            import torch
            return "cuda" if torch.cuda.is_available() else "cpu"
        return v.strip()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            return tuple(k.strip() for k in v.split(",") if k.strip())
        return tuple(str(k) for k in v if str(k))
