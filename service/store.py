"""The durable job store: one table of jobs (SQLAlchemy 2 Core) plus a folder of array files.

SQLite (WAL, ``synchronous=FULL``) under ``RECONSERVE_DATA_DIR`` is the embedded default; the
same portable SQL runs on PostgreSQL (``RECONSERVE_DATABASE_URL``). A job's arrays never go
into the database: its decoded request arrays are ``.npy`` files and its result one ``.npz``
in ``<data_dir>/jobs/<id>/``, written and fsynced before the row that refers to them is
committed, so a row never points at a missing file.

Schema versions: ``schema_version`` holds the version the store was written with;
``MIGRATIONS[v]`` upgrades version ``v`` to ``v + 1``. A newer server opens an older store by
running the missing steps; an older server refuses a newer store.

Claims (scale-out, ``service/cluster.py``): a worker replica claims a queued job (``owner``,
``heartbeat_ts``) and renews its lease while it holds it; a job whose owner stopped renewing is
released to ``queued`` and run again elsewhere. Writes by an owner are guarded by its ownership,
so a replica that lost a job can no longer change it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import sqlalchemy as sa

from .codecs import npy_bytes

SCHEMA_VERSION = 4

metadata = sa.MetaData()

jobs_table = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("num_samples", sa.Integer, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32)),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("created_ts", sa.Float, nullable=False),  # wall clock (s): deadlines
    sa.Column("finished_ts", sa.Float, index=True),  # wall clock (s): retention
    sa.Column("request", sa.Text, nullable=False),  # JSON body, arrays as {"file": name}
    sa.Column("error", sa.Text),  # JSON {"code", "message"}
    sa.Column("result", sa.Text),  # JSON: metrics, nfe, elapsed_s, batched_with, method
    sa.Column("bytes", sa.BigInteger, nullable=False, default=0),  # on disk: request + result
    sa.Column("cost", sa.Float, nullable=False, default=0.0),  # admission cost units
    sa.Column("idempotency_key", sa.String(255), unique=True),
    sa.Column("body_digest", sa.String(64)),
    sa.Column("owner", sa.String(200)),  # the worker replica holding the job (scale-out), else NULL
    sa.Column("heartbeat_ts", sa.Float),  # wall clock (s) of its owner's last lease renewal
    sa.Column("caller", sa.String(64), index=True),  # who submitted it (a digest of the API key), else NULL
    sa.Column("callback", sa.Text),  # JSON: its callback's delivery as JobStatus shows it, else NULL
    sa.Column("callback_due", sa.Float, index=True),  # wall clock (s) of the next delivery attempt, else NULL
)

version_table = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

#: ``MIGRATIONS[v](connection)`` upgrades a store at version ``v`` to ``v + 1``.
MIGRATIONS: dict[int, Any] = {}


def _add_claim_columns(c) -> None:
    """1 -> 2: the claim columns of scale-out."""
    c.execute(sa.text("ALTER TABLE jobs ADD COLUMN owner VARCHAR(200)"))
    c.execute(sa.text("ALTER TABLE jobs ADD COLUMN heartbeat_ts FLOAT"))


MIGRATIONS[1] = _add_claim_columns


def _add_caller_column(c) -> None:
    """2 -> 3: who submitted each job (``GET /v1/jobs`` lists a caller's own)."""
    c.execute(sa.text("ALTER TABLE jobs ADD COLUMN caller VARCHAR(64)"))
    c.execute(sa.text("CREATE INDEX ix_jobs_caller ON jobs (caller)"))


MIGRATIONS[2] = _add_caller_column


def _add_callback_columns(c) -> None:
    """3 -> 4: callbacks (``service/callbacks.py``): the delivery and its next attempt's time."""
    c.execute(sa.text("ALTER TABLE jobs ADD COLUMN callback TEXT"))
    c.execute(sa.text("ALTER TABLE jobs ADD COLUMN callback_due FLOAT"))
    c.execute(sa.text("CREATE INDEX ix_jobs_callback_due ON jobs (callback_due)"))


MIGRATIONS[3] = _add_callback_columns

UNFINISHED = ("queued", "running", "cancelling")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class JobRecord:
    """One row of ``jobs`` (the columns the service reads)."""

    id: str
    status: str
    model: str
    method: str
    num_samples: int
    seed: int
    step: int
    total: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    created_ts: float
    finished_ts: float | None
    request: dict
    error: dict | None
    result: dict | None
    bytes: int
    cost: float
    idempotency_key: str | None = None
    body_digest: str | None = None
    owner: str | None = None
    heartbeat_ts: float | None = None
    caller: str | None = None
    callback: dict | None = None
    callback_due: float | None = None

    @classmethod
    def from_row(cls, row) -> "JobRecord":
        m = dict(row._mapping)
        for k in ("request", "error", "result", "callback"):  # (a row read without its request: {})
            m[k] = json.loads(m[k]) if m.get(k) else ({} if k == "request" else None)
        return cls(**m)


@dataclass
class StoredResult:
    samples: np.ndarray  # [K, C, H, W] float32
    observation_view: np.ndarray | None  # [C, H, W] float32 or None
    meta: dict = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobStore:
    """The jobs table and the files beside it. Thread-safe (a connection per call)."""

    def __init__(self, data_dir: str | Path, url: str | None = None):
        self.data_dir = Path(data_dir)
        self.files = self.data_dir / "jobs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.url = url or f"sqlite:///{self.data_dir / 'jobs.sqlite3'}"
        self.engine = sa.create_engine(self.url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self.engine.begin() as c:
            metadata.create_all(c, tables=[version_table])
            row = c.execute(sa.select(version_table.c.version)).first()
            if row is None:  # a new store
                metadata.create_all(c)
                c.execute(version_table.insert().values(version=SCHEMA_VERSION))
                return
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the job store at {self.url} has schema version {version}, newer than "
                                   f"this server's {SCHEMA_VERSION}; run a newer server or another data dir")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](c)
                version += 1
                c.execute(version_table.update().values(version=version))

    def schema_version(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.select(version_table.c.version)).scalar_one())

    # ------------------------------------------------------------------ files
    def job_dir(self, job_id: str) -> Path:
        return self.files / job_id

    def _dir_bytes(self, job_id: str) -> int:
        d = self.job_dir(job_id)
        return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.is_dir() else 0

    def load_request_files(self, record: JobRecord) -> dict[str, bytes]:
        """The request's arrays as ``.npy`` bytes by name (the names its ``{"file": name}`` use)."""
        return {p.name[:-4]: p.read_bytes() for p in self.job_dir(record.id).glob("*.npy")}

    def load_request_file(self, job_id: str, name: str) -> bytes | None:
        """One of the request's arrays as ``.npy`` bytes (None if the job has none of that name)."""
        path = self.job_dir(job_id) / f"{name}.npy"
        return path.read_bytes() if path.is_file() else None

    def load_result(self, job_id: str) -> StoredResult | None:
        path = self.job_dir(job_id) / "result.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            obs = z["observation_view"] if "observation_view" in z.files else None
            return StoredResult(z["samples"], obs)

    # ------------------------------------------------------------------ writes
    def insert(self, record: JobRecord, arrays: dict[str, np.ndarray]) -> None:
        """Write the request arrays (fsynced), then commit the row: durable when this returns.
        Raises ``sa.exc.IntegrityError`` if the idempotency key is taken (files removed)."""
        d = self.job_dir(record.id)
        d.mkdir(parents=True, exist_ok=True)
        for name, a in arrays.items():
            _write_atomic(d / f"{name}.npy", npy_bytes(a))
        _fsync_dir(d)
        _fsync_dir(self.files)
        record.bytes = self._dir_bytes(record.id)
        values = {k: getattr(record, k) for k in jobs_table.c.keys()}
        values.update(request=json.dumps(record.request), error=_dumps(record.error), result=_dumps(record.result),
                      callback=_dumps(record.callback))
        try:
            with self.engine.begin() as c:
                c.execute(jobs_table.insert().values(**values))
        except sa.exc.IntegrityError:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def update(self, job_id: str, owner: str | None = None, only_from: tuple[str, ...] | None = None,
               **values) -> bool:
        """Change a job's row; with ``owner``, only while that owner holds the job; with
        ``only_from``, only while its status is one of those. Returns whether the row changed."""
        for k in ("error", "result", "callback"):
            if k in values:
                values[k] = _dumps(values[k])
        where = jobs_table.c.id == job_id
        if owner is not None:
            where = where & (jobs_table.c.owner == owner)
        if only_from is not None:
            where = where & jobs_table.c.status.in_(only_from)
        with self.engine.begin() as c:
            return c.execute(jobs_table.update().where(where).values(**values)).rowcount > 0

    def finish(self, job_id: str, *, status: str, finished_at: str, error: dict | None = None,
               result: StoredResult | None = None, step: int | None = None, owner: str | None = None) -> None:
        """Write the result file (if any, fsynced), then the row's final state (with ``owner``,
        only while that owner holds the job)."""
        values: dict[str, Any] = {"status": status, "finished_at": finished_at, "finished_ts": time.time(),
                                  "error": error}
        if result is not None:
            arrays = {"samples": np.asarray(result.samples, dtype=np.float32)}
            if result.observation_view is not None:
                arrays["observation_view"] = np.asarray(result.observation_view, dtype=np.float32)
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            _write_atomic(self.job_dir(job_id) / "result.npz", buf.getvalue())
            _fsync_dir(self.job_dir(job_id))
            values["result"] = result.meta
        if step is not None:
            values["step"] = step
        values["bytes"] = self._dir_bytes(job_id)
        self.update(job_id, owner=owner, **values)

    # ------------------------------------------------------------------ claims (scale-out)
    def claim(self, job_id: str, owner: str) -> bool:
        """Take a queued, unclaimed job for ``owner`` (atomic: one claimant wins)."""
        t = jobs_table.c
        with self.engine.begin() as c:
            return c.execute(jobs_table.update().where(
                (t.id == job_id) & (t.status == "queued") & t.owner.is_(None)).values(
                owner=owner, heartbeat_ts=time.time())).rowcount > 0

    def renew(self, owner: str, job_ids: list[str]) -> dict[str, str]:
        """Renew ``owner``'s lease on ``job_ids``; returns the status of each job it still holds
        (a job another claimant took, or that was deleted, is missing)."""
        t = jobs_table.c
        held: dict[str, str] = {}
        for chunk in _chunks(job_ids, 500):
            with self.engine.begin() as c:
                c.execute(jobs_table.update().where(t.id.in_(chunk) & (t.owner == owner))
                          .values(heartbeat_ts=time.time()))
                held.update(c.execute(sa.select(t.id, t.status).where(t.id.in_(chunk) & (t.owner == owner))).all())
        return held

    def release(self, job_id: str, owner: str | None, cancelled: dict, finished_at: str) -> bool:
        """Put a job ``owner`` held back in the queue, unclaimed, to run again from the start (a
        job left ``cancelling`` is finished as cancelled with the error ``cancelled``)."""
        t = jobs_table.c
        where = (t.id == job_id) & t.status.in_(UNFINISHED)
        where = where & (t.owner.is_(None) if owner is None else t.owner == owner)
        with self.engine.begin() as c:
            changed = c.execute(jobs_table.update().where(where & (t.status != "cancelling")).values(
                status="queued", owner=None, heartbeat_ts=None, started_at=None, step=0)).rowcount
            changed += c.execute(jobs_table.update().where(where & (t.status == "cancelling")).values(
                status="cancelled", owner=None, finished_at=finished_at, finished_ts=time.time(),
                error=json.dumps(cancelled))).rowcount
        return changed > 0

    def stale(self, before_ts: float) -> list[JobRecord]:
        """Unfinished jobs whose owner has not renewed its lease since ``before_ts``."""
        t = jobs_table.c
        with self.engine.connect() as c:
            rows = c.execute(sa.select(jobs_table).where(
                t.status.in_(UNFINISHED) & t.owner.is_not(None) & (t.heartbeat_ts < before_ts))).all()
        return [JobRecord.from_row(r) for r in rows]

    def queued_totals(self) -> tuple[int, float, int]:
        """Jobs waiting for a worker (queued, unclaimed): count, total cost, bytes held."""
        t = jobs_table.c
        with self.engine.connect() as c:
            row = c.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(t.cost), 0.0),
                                      sa.func.coalesce(sa.func.sum(t.bytes), 0))
                            .where((t.status == "queued") & t.owner.is_(None))).one()
        return int(row[0]), float(row[1]), int(row[2])

    def cancel_queued(self, job_id: str, error: dict, finished_at: str) -> bool:
        """Cancel a job no worker holds yet (atomic against a claim)."""
        t = jobs_table.c
        with self.engine.begin() as c:
            return c.execute(jobs_table.update().where(
                (t.id == job_id) & (t.status == "queued") & t.owner.is_(None)).values(
                status="cancelled", finished_at=finished_at, finished_ts=time.time(),
                error=json.dumps(error))).rowcount > 0

    def request_cancel(self, job_id: str) -> bool:
        """Mark a job a worker holds ``cancelling``; its worker stops it."""
        t = jobs_table.c
        with self.engine.begin() as c:
            return c.execute(jobs_table.update().where(
                (t.id == job_id) & t.status.in_(("queued", "running"))).values(status="cancelling")).rowcount > 0

    def states(self, job_ids: list[str]) -> dict[str, JobRecord]:
        """The rows of ``job_ids`` (those that exist), without their request (polled often)."""
        cols = [c for c in jobs_table.c if c.name != "request"]
        out: dict[str, JobRecord] = {}
        for chunk in _chunks(job_ids, 500):
            with self.engine.connect() as c:
                for r in c.execute(sa.select(*cols).where(jobs_table.c.id.in_(chunk))).all():
                    out[r.id] = JobRecord.from_row(r)
        return out

    def unclaimed(self) -> list[str]:
        """Ids of the queued jobs no worker holds, oldest first."""
        t = jobs_table.c
        with self.engine.connect() as c:
            return list(c.execute(sa.select(t.id).where((t.status == "queued") & t.owner.is_(None))
                                  .order_by(t.created_ts)).scalars())

    # ------------------------------------------------------------------ callbacks (service/callbacks.py)
    def due_callbacks(self, now: float, limit: int = 50) -> list[str]:
        """Ids of finished jobs whose callback's next attempt is due at ``now``, longest due first."""
        t = jobs_table.c
        with self.engine.connect() as c:
            return list(c.execute(sa.select(t.id).where(t.callback_due.is_not(None) & (t.callback_due <= now)
                                                        & t.status.in_(FINISHED))
                                  .order_by(t.callback_due).limit(limit)).scalars())

    def claim_callback(self, job_id: str, now: float, hold_s: float) -> JobRecord | None:
        """Take the due attempt of ``job_id``'s callback (atomic: one claimant wins): its due time
        moves ``hold_s`` on, so no other process tries meanwhile. -> the job's row, or None."""
        t = jobs_table.c
        with self.engine.begin() as c:
            won = c.execute(jobs_table.update().where((t.id == job_id) & (t.callback_due <= now) & t.status.in_(
                FINISHED)).values(callback_due=now + hold_s)).rowcount > 0
        return self.get(job_id) if won else None

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return JobRecord.from_row(row) if row is not None else None

    def find_key(self, key: str) -> JobRecord | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(jobs_table).where(jobs_table.c.idempotency_key == key)).first()
        return JobRecord.from_row(row) if row is not None else None

    def listing(self, caller: str | None, statuses: tuple[str, ...] = (), limit: int = 50,
                after: tuple[float, str] | None = None) -> list[JobRecord]:
        """A caller's jobs (every job when ``caller`` is None), newest first, without their requests;
        ``after``: the ``(created_ts, id)`` of the last job of the previous page."""
        t = jobs_table.c
        q = sa.select(*[col for col in jobs_table.c if col.name != "request"])
        if caller is not None:
            q = q.where(t.caller == caller)
        if statuses:
            q = q.where(t.status.in_(statuses))
        if after is not None:
            q = q.where((t.created_ts < after[0]) | ((t.created_ts == after[0]) & (t.id < after[1])))
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(t.created_ts.desc(), t.id.desc()).limit(limit)).all()
        return [JobRecord.from_row(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        """Jobs a previous process accepted and did not finish, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(jobs_table).where(jobs_table.c.status.in_(UNFINISHED))
                             .order_by(jobs_table.c.created_ts)).all()
        return [JobRecord.from_row(r) for r in rows]

    # ------------------------------------------------------------------ retention
    def expire(self, *, ttl_s: float, max_jobs: int, max_bytes: int, now: float | None = None) -> list[str]:
        """Expire finished jobs past ``ttl_s``, then the oldest while more than ``max_jobs`` hold
        data or they hold more than ``max_bytes``. An expired job keeps a row (status ``expired``,
        so it answers 410, not 404) and loses its files. Returns the expired ids."""
        now = time.time() if now is None else now
        with self.engine.connect() as c:
            rows = c.execute(sa.select(jobs_table.c.id, jobs_table.c.finished_ts, jobs_table.c.bytes)
                             .where(jobs_table.c.status.in_(FINISHED))
                             .order_by(jobs_table.c.finished_ts)).all()
        count, size = len(rows), sum(int(r.bytes or 0) for r in rows)
        gone = []
        for r in rows:
            old = now - float(r.finished_ts or now) > ttl_s
            if not old and count <= max_jobs and size <= max_bytes:
                break
            gone.append(r.id)
            count -= 1
            size -= int(r.bytes or 0)
        for chunk in _chunks(gone, 500):
            with self.engine.begin() as c:
                c.execute(jobs_table.update().where(jobs_table.c.id.in_(chunk))
                          .values(status="expired", bytes=0, result=None))
        for job_id in gone:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return gone

    def close(self) -> None:
        self.engine.dispose()


def _dumps(v) -> str | None:
    return None if v is None else json.dumps(v)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
