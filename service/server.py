"""Run the service with uvicorn: ``serve(host, port, models_dir, device)`` (the CLI calls this)."""
from __future__ import annotations

from pathlib import Path


def serve(host: str = "127.0.0.1", port: int = 8000, models_dir: str | Path | None = None,
          device: str | None = None, log_level: str = "info") -> None:
    """Serve the API on ``host:port``; settings come from ``RECONSERVE_*`` variables, with
    ``models_dir`` and ``device`` overriding them when given."""
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {}
    if models_dir is not None:
        overrides["models_dir"] = Path(models_dir)
    if device is not None:
        overrides["device"] = device
    app = create_app(Settings(**overrides))
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, timeout_graceful_shutdown=10)
