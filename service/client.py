"""A Python client of the HTTP API: numpy arrays in, numpy arrays out.

    c = Client("http://127.0.0.1:8000", api_key=None)
    out = c.reconstruct("grf-32", {"kind": "inpainting", "mask": mask}, y, method={"name": "fast", "steps": 30})
    out["mean"], out["std"], out["nfe"], out["metrics"]

Arrays (the observation, and numpy arrays anywhere in the operator) travel as base64 ``.npy``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Iterable

import httpx
import numpy as np

from .codecs import from_encoded, to_npy_field, walk_arrays

ARRAY_KEYS = ("mean", "std", "samples")


class ServiceError(RuntimeError):
    """An error answer of the service: ``status``, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 3, transport: httpx.BaseTransport | None = None):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                 transport=transport)
        self.retries = retries

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            r = self.http.request(method, path, **kw)
            if r.status_code == 429 and attempt < self.retries:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code >= 400:
                raise _error(r)
            return r
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _body(model, operator, observation, noise_sigma=0.0, method=None, num_samples=1, seed=0,
              pde=None, return_: Iterable[str] = ("mean", "std"), completion: str = "auto") -> dict:
        if isinstance(method, str):
            method = {"name": method}
        return {"model": model, "completion": completion,
                "operator": walk_arrays(dict(operator), to_npy_field),
                "observation": observation if isinstance(observation, dict) else to_npy_field(np.asarray(observation)),
                "noise_sigma": float(noise_sigma), "pde": pde, "method": method,
                "num_samples": int(num_samples), "seed": int(seed), "return": list(return_)}

    @staticmethod
    def _decode(result: dict) -> dict:
        out = dict(result)
        for k in ARRAY_KEYS:
            out[k] = from_encoded(result.get(k))
        return out

    # ------------------------------------------------------------------ catalogue
    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def model(self, model_id: str) -> dict:
        return self._request("GET", f"/v1/models/{model_id}").json()

    def methods(self) -> list[dict]:
        return self._request("GET", "/v1/methods").json()["methods"]

    def operators(self) -> list[dict]:
        return self._request("GET", "/v1/operators").json()["operators"]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ reconstruction
    def reconstruct(self, model: str, operator: dict, observation, noise_sigma: float = 0.0,
                    method: str | dict | None = None, num_samples: int = 1, seed: int = 0,
                    pde: dict | None = None, return_: Iterable[str] = ("mean", "std"),
                    completion: str = "auto") -> dict:
        """``POST /v1/reconstruct``: waits; returns the Result with numpy arrays (None where absent)."""
        body = self._body(model, operator, observation, noise_sigma, method, num_samples, seed, pde, return_,
                          completion)
        return self._decode(self._request("POST", "/v1/reconstruct", json=body).json())

    def submit(self, model: str, operator: dict, observation, noise_sigma: float = 0.0,
               method: str | dict | None = None, num_samples: int = 1, seed: int = 0,
               pde: dict | None = None, return_: Iterable[str] = ("mean", "std"), completion: str = "auto",
               idempotency_key: str | None = None) -> str:
        """``POST /v1/jobs``: the job id. Sent with an ``Idempotency-Key`` (a fresh one unless
        given) and sent again with the same key when the connection fails or the server is
        restarting (503), so a retry never makes a second job."""
        body = self._body(model, operator, observation, noise_sigma, method, num_samples, seed, pde, return_,
                          completion)
        return self.submit_body(body, idempotency_key)

    def submit_body(self, body: dict, idempotency_key: str | None = None) -> str:
        """``submit`` of a request body already in the API's JSON form."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        for attempt in range(self.retries + 1):
            try:
                return self._request("POST", "/v1/jobs", json=body, headers=headers).json()["id"]
            except (httpx.TransportError, ServiceError) as e:
                if attempt == self.retries or (isinstance(e, ServiceError) and e.status != 503):
                    raise
                time.sleep(getattr(e, "retry_after", None) or 1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def status(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, progress: Callable[[dict], Any] | None = None,
             timeout: float | None = None) -> dict:
        """Wait for the job to finish (server-sent events; polling if the stream breaks).
        ``progress`` gets each ``{"id", "status", "progress": {"step", "total"}}``. Returns the
        final JobStatus."""
        end = None if timeout is None else time.monotonic() + timeout
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events",
                                  timeout=httpx.Timeout(self.http.timeout.connect, read=60.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r)
                event = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if event == "status":
                            if data["status"] in FINAL:
                                return data
                            break  # the server is shutting down: the job resumes after its restart
                        if progress is not None:
                            progress(data)
                    if end is not None and time.monotonic() > end:
                        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
        except (httpx.TransportError, httpx.StreamError):
            pass
        while True:  # fallback: poll (through a restart of the server: nothing accepted is lost)
            try:
                st = self.status(job_id)
            except httpx.TransportError:
                st = None
            except ServiceError as e:
                if e.status != 503:
                    raise
                st = None
            if st is None:
                if end is not None and time.monotonic() > end:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                time.sleep(1.0)
                continue
            if st["status"] in FINAL:
                return st
            if progress is not None:
                progress({"id": job_id, "status": st["status"], "progress": st["progress"]})
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(0.2)

    def result(self, job_id: str) -> dict:
        """The Result with numpy arrays (raises ``ServiceError`` if the job failed or is not done)."""
        return self._decode(self._request("GET", f"/v1/jobs/{job_id}/result").json())

    def cancel(self, job_id: str) -> dict:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()


#: Statuses after which a job changes no more.
FINAL = ("succeeded", "failed", "cancelled", "expired")


def _error(r: httpx.Response) -> ServiceError:
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except Exception:  # noqa: BLE001
        code, message = "http_error", r.text[:200]
    ra = r.headers.get("Retry-After")
    return ServiceError(r.status_code, code, message, float(ra) if ra else None)
