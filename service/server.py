"""Run the service with uvicorn: ``serve(host, port, models_dir, device)`` (the CLI calls this)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

import uvicorn

logger = logging.getLogger("uvicorn.error")


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


class ReconserveServer(uvicorn.Server):
    """uvicorn's server that tells the app about a shutdown the moment SIGTERM/SIGINT arrives.

    uvicorn's own handling only sets a flag; its main loop notices it within 0.1 s, stops
    listening and then waits up to ``timeout_graceful_shutdown`` for open connections, which
    a waiting ``/v1/reconstruct`` or an SSE stream would hold to the end. The app's
    ``begin_shutdown()`` (stop admitting, interrupt the running batch, end streams and
    waiters) therefore runs first, from the signal handler itself (the main thread, between
    two bytecodes of whatever the loop was doing), once.
    """

    _shutdown_begun = False

    def handle_exit(self, sig: int, frame) -> None:
        if not self._shutdown_begun:
            self._shutdown_begun = True
            state = getattr(getattr(self.config.app, "state", None), "reconserve", None)
            begin = getattr(state, "begin_shutdown", None)
            if callable(begin):
                try:
                    begin()
                except Exception:  # the signal must still stop the server
                    logger.exception("begin_shutdown() failed; shutting down anyway")
        super().handle_exit(sig, frame)


def serve(host: str = "127.0.0.1", port: int = 8000, models_dir: str | Path | None = None,
          device: str | None = None, log_level: str = "info", data_dir: str | Path | None = None) -> None:
    """Serve the API on ``host:port``; settings come from ``RECONSERVE_*`` variables, with
    ``models_dir``, ``device`` and ``data_dir`` (the job store) overriding them when given."""
    from .app import create_app
    from .protocols import http_protocol

    keep_freed_memory()
    # the service's own loggers (reconserve.*: device, job store, recovery, shutdown) beside uvicorn's
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s:     %(message)s")
    from .settings import Settings

    overrides = {}
    if models_dir is not None:
        overrides["models_dir"] = Path(models_dir)
    if device is not None:
        overrides["device"] = device
    if data_dir is not None:
        overrides["data_dir"] = Path(data_dir)
    settings = Settings(**overrides)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=int(port), log_level=log_level,
        # uvicorn has no deadline on a request head: a client dripping header bytes (slow
        # loris) would hold its connection for ever. This protocol (httptools, or h11 where
        # httptools is missing) answers 408 and closes it after header_timeout_s.
        http=http_protocol(settings.header_timeout_s),
        # Idle keep-alive connections are closed after this; a client's next request on a
        # connection it kept must start within it.
        timeout_keep_alive=settings.keep_alive_s,
        # Past this many open connections (or running requests) a request is answered at once
        # with a JSON 503 + Retry-After (service/protocols.py) instead of being run: a bound on
        # the work and memory in flight. Connections are still accepted, and ones that never
        # finish a head leave within header_timeout_s, so the limit cannot be held for long.
        limit_concurrency=settings.max_connections,
        # After SIGTERM, open connections get this long to finish before their tasks are
        # cancelled; begin_shutdown() (ReconserveServer) ends waiters and streams well before.
        timeout_graceful_shutdown=10,
    )
    server = ReconserveServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl+C during shutdown, as uvicorn.run allows
        pass
    if not server.started:  # could not bind or start, as uvicorn.run reports it
        sys.exit(3)
