"""uvicorn's HTTP/1.1 protocols with a deadline on the request head (slow-loris protection).

uvicorn times out idle keep-alive connections, but not a request head that is still arriving:
a client that opens a connection and sends nothing, or drips the request line and headers one
byte every few seconds, holds the connection (and a slot of ``limit_concurrency``) for ever.
The classes here close such a connection when the request line and headers are not complete
``header_timeout_s`` after the connection opened, or after the first byte of a later request
on a keep-alive connection. A client that sent part of a head gets a ``408`` with the API's
JSON error body before the close; one that sent nothing is just closed (as nginx does).

They also answer uvicorn's connection limit (``limit_concurrency``) with the API's JSON error
body and a ``Retry-After`` instead of uvicorn's plain-text ``503``.

``http_protocol(header_timeout_s)`` gives the class for ``uvicorn.Config(http=...)``.
Body reads are not timed here: a request body is read by the app, under its own limits.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from typing import Any

logger = logging.getLogger("uvicorn.error")


def _raw_response(status: int, reason: str, code: str, message: str,
                  extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with ``{"error": {code, message}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{k}: {v}" for k, v in extra_headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _HeadDeadline:
    """Mixin before uvicorn's protocol class: the request-head deadline and the JSON 503.

    The subclasses tell it when a head starts (``_head_started``) and when it is complete
    (``_head_complete``); the deadline runs from the connection's opening for the first
    request, and from the first byte of each later one.
    """

    #: Seconds a client has to send the request line and headers (set by ``http_protocol``).
    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # part of a request head has arrived, the rest has not
        # uvicorn would answer its connection limit with a plain-text 503 from inside the
        # protocol; the same check, made here in front of the app, answers in the API's shape.
        self._connection_limit: int | None = self.limit_concurrency
        self.limit_concurrency = None
        if self._connection_limit is not None:
            self._inner_app, self.app = self.app, self._limited_app

    # ------------------------------------------------------------------ the deadline
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _head_started(self) -> None:
        self._head_bytes = True
        self._arm_head_timer()  # no-op while the timer of the connection's opening still runs

    def _head_complete(self) -> None:
        self._head_bytes = False
        self._cancel_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head is arriving while an earlier request is still answered: that
            # response is real work, not a stall; look again later.
            self._arm_head_timer()
            return
        client = "%s:%d - " % self.client if self.client else ""
        if self._head_bytes:
            logger.info("%sRequest line and headers not complete within %g s: 408, connection closed",
                        client, self.header_timeout_s)
            transport.write(_raw_response(
                408, "Request Timeout", "request_timeout",
                f"the request line and headers did not arrive within {self.header_timeout_s:g} s; "
                "send the whole request head at once"))
        else:
            logger.debug("%sNo request within %g s: connection closed", client, self.header_timeout_s)
        transport.close()

    # ------------------------------------------------------------------ the connection limit
    async def _limited_app(self, scope: Any, receive: Any, send: Any) -> None:
        limit = self._connection_limit
        # As uvicorn counts: this connection is in ``connections``; this request's task is
        # already in ``tasks`` here (uvicorn checks just before adding it, hence ``>``).
        if len(self.connections) >= limit or len(self.tasks) > limit:  # type: ignore[operator]
            logger.warning("Exceeded concurrency limit.")
            body = json.dumps({"error": {
                "code": "too_many_connections",
                "message": f"the server holds its limit of {limit} connections; retry shortly "
                           "over a new connection"}}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(self.header_timeout_s))).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self._inner_app(scope, receive, send)


@functools.cache
def _httptools_class() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadDeadlineHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        """httptools: the parser reports the first byte of a message and the end of its head."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_started()

        def on_headers_complete(self) -> None:
            self._head_complete()
            super().on_headers_complete()

    return HeadDeadlineHttpToolsProtocol


@functools.cache
def _h11_class() -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11Protocol(_HeadDeadline, H11Protocol):
        """h11: after each read, the peer's state says whether a head is still being read
        (``IDLE`` once bytes came) or is complete (any later state)."""

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                if data:
                    self._head_started()
            else:
                self._head_complete()

    return HeadDeadlineH11Protocol


_CLASSES: dict[tuple[str, float], type[asyncio.Protocol]] = {}


def http_protocol(header_timeout_s: float, kind: str = "auto") -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``: uvicorn's ``kind`` ("auto":
    httptools where installed, else h11; "httptools"; "h11") with a ``header_timeout_s``
    deadline on each request head."""
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s!r}")
    if kind == "auto":
        try:
            import httptools  # noqa: F401
            kind = "httptools"
        except ImportError:
            kind = "h11"
    if kind not in ("httptools", "h11"):
        raise ValueError(f"kind must be 'auto', 'httptools' or 'h11', got {kind!r}")
    key = (kind, float(header_timeout_s))
    if key not in _CLASSES:
        base = _httptools_class() if kind == "httptools" else _h11_class()
        _CLASSES[key] = type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s),
                                                       "__module__": __name__})
    return _CLASSES[key]
