"""The one error shape of the API: ``{"error": {"code", "message"}}`` with API.md's status codes."""
from __future__ import annotations

import re

_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_SHORT = re.compile(r"[\w .,:;/+\-\[\]()=<>]{0,40}")
_LONG_TOKEN = re.compile(r"\S{80,}")


def scrub(message: str, limit: int = 1000) -> str:
    """A message safe to send back: quoted values that are long or odd become '<value>', long
    tokens are cut, the whole is capped (lower layers sometimes quote what they were given)."""
    def quoted(m):
        inner = m.group(0)[1:-1]
        return m.group(0) if _SHORT.fullmatch(inner) else "'<value>'"

    message = _QUOTED.sub(quoted, str(message))
    message = _LONG_TOKEN.sub(lambda m: m.group(0)[:40] + "...", message)
    return message if len(message) <= limit else message[:limit] + "..."


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        message = scrub(message)
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


#: Default codes for bare HTTP statuses (framework errors such as unknown routes).
STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "too_large",
    415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full", 503: "not_ready",
}
