"""OpenAPI pieces the routers share."""
from __future__ import annotations

import json

from .. import schemas

ERROR_RESPONSES = {s: {"model": schemas.Error, "description": d} for s, d in (
    (401, "API key missing or wrong"), (404, "unknown model, operator kind, method or job"),
    (408, "the body did not arrive in time"),
    (409, "result asked for before the job finished"), (410, "the job is past retention (expired)"),
    (413, "body or array over the limits"), (422, "invalid request"),
    (429, "queue full (Retry-After)"), (503, "not ready or shutting down (Retry-After)"))}


def public_card(card: dict) -> dict:
    """The card as served (JSON-safe copy)."""
    return json.loads(json.dumps(card, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
