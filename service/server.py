"""Run the service with uvicorn: ``serve(host, port, models_dir, device)`` (the CLI calls this)."""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed tensor buffers back to the kernel after every step.

    Its default thresholds return large freed blocks at once, so each sampler step faults
    them back in (about 70,000 minor page faults for a 50-step phantom job, 15-30 % slower
    than the same solve in a short-lived process; ``bench/http_overhead.py``). Raising the
    mmap and trim thresholds keeps them in the heap. No-op where libc is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def serve(host: str = "127.0.0.1", port: int = 8000, models_dir: str | Path | None = None,
          device: str | None = None, log_level: str = "info") -> None:
    """Serve the API on ``host:port``; settings come from ``RECONSERVE_*`` variables, with
    ``models_dir`` and ``device`` overriding them when given."""
    import uvicorn

    from .app import create_app

    keep_freed_memory()
    from .settings import Settings

    overrides = {}
    if models_dir is not None:
        overrides["models_dir"] = Path(models_dir)
    if device is not None:
        overrides["device"] = device
    app = create_app(Settings(**overrides))
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, timeout_graceful_shutdown=10)
