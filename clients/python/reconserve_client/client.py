"""``Client``: the HTTP API from Python, numpy arrays in, numpy arrays out.

    c = Client("http://127.0.0.1:8000", api_key=None)
    out = c.reconstruct("grf-32", {"kind": "inpainting", "mask": mask}, y, method={"name": "fast", "steps": 30})
    out["mean"], out["std"], out["nfe"], out["metrics"]

Arrays (the observation, and numpy arrays anywhere in the operator) travel as base64 ``.npy``.
An observation may also be a file path (``.nii``/``.nii.gz``, a DICOM ``.zip`` or folder, a
``.tif`` stack, ``.png``, ``.npy``): it goes as that file, and the result comes back in the same
format too (``out["file"]``; or ``out=`` a path whose name says the format):

    out = c.reconstruct("phantom-64", {"kind": "ct", "angles": 30}, "scan.nii.gz",
                        value_window=[-1000, 1000], out="recon.nii.gz")
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
import numpy as np

from .arrays import from_encoded, to_npy_field, walk_arrays
from .files import encode_path, file_format, is_path, result_format, write_result_file

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
              pde=None, return_: Iterable[str] = ("mean", "std"), completion: str = "auto",
              value_window=None) -> dict:
        """The request body; ``observation``: an array, an encoding (dict) or a file path."""
        if isinstance(method, str):
            method = {"name": method}
        if is_path(observation):
            observation = encode_path(observation)
        body = {"model": model, "completion": completion,
                "operator": walk_arrays(dict(operator), to_npy_field),
                "observation": observation if isinstance(observation, dict) else to_npy_field(np.asarray(observation)),
                "noise_sigma": float(noise_sigma), "pde": pde, "method": method,
                "num_samples": int(num_samples), "seed": int(seed), "return": list(return_)}
        if value_window is not None:
            body["value_window"] = [float(v) for v in value_window]
        return body

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
                    completion: str = "auto", value_window=None, out=None) -> dict:
        """``POST /v1/reconstruct``: waits; returns the Result with numpy arrays (None where absent).
        A file path as ``observation`` also gives ``"file"``: the mean in that file's format (a
        PNG's as TIFF); ``out``: a path to write the mean to, in the format its name says."""
        body = self._body(model, operator, observation, noise_sigma, method, num_samples, seed, pde, return_,
                          completion, value_window)
        out_format = result_format(out) if out is not None else None
        res = self._decode(self._request("POST", "/v1/reconstruct", json=body).json())
        if out_format is None and is_path(observation):
            out_format = {"png": "tiff"}.get(file_format(observation), file_format(observation))
        if out_format is not None:
            res["file"] = self.result_file(res["id"], out_format)
            if out is not None:
                write_result_file(out, res["file"])
        return res

    def submit(self, model: str, operator: dict, observation, noise_sigma: float = 0.0,
               method: str | dict | None = None, num_samples: int = 1, seed: int = 0,
               pde: dict | None = None, return_: Iterable[str] = ("mean", "std"), completion: str = "auto",
               idempotency_key: str | None = None, value_window=None) -> str:
        """``POST /v1/jobs``: the job id. Sent with an ``Idempotency-Key`` (a fresh one unless
        given) and sent again with the same key when the connection fails or the server is
        restarting (503), so a retry never makes a second job."""
        body = self._body(model, operator, observation, noise_sigma, method, num_samples, seed, pde, return_,
                          completion, value_window)
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
            final = self._follow_events(job_id, progress, end, timeout)
            if final is not None:
                return final
        except (httpx.TransportError, httpx.StreamError):
            pass
        return self._poll(job_id, progress, end, timeout)

    def _follow_events(self, job_id, progress, end, timeout) -> dict | None:
        """``GET /v1/jobs/{id}/events`` until its final status event -> that status; None when the
        stream ends first (the server is shutting down: the job resumes after its restart)."""
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
                        return data if data["status"] in FINAL else None
                    if progress is not None:
                        progress(data)
                _check_deadline(job_id, end, timeout)
        return None

    def _poll(self, job_id, progress, end, timeout) -> dict:
        """``GET /v1/jobs/{id}`` until final, through a restart of the server (nothing accepted is
        lost: a refused connection or a 503 is waited out)."""
        while True:
            try:
                st = self.status(job_id)
            except httpx.TransportError:
                st = None
            except ServiceError as e:
                if e.status != 503:
                    raise
                st = None
            if st is not None and st["status"] in FINAL:
                return st
            if st is not None and progress is not None:
                progress({"id": job_id, "status": st["status"], "progress": st["progress"]})
            _check_deadline(job_id, end, timeout)
            time.sleep(1.0 if st is None else 0.2)

    def list_jobs(self, status: str | Iterable[str] | None = None, limit: int | None = None,
                  page_token: str | None = None) -> dict:
        """``GET /v1/jobs``: one page of the caller's jobs, newest first, ``{"jobs": [JobStatus,
        ...], "next_page_token": str | None}``; ``status`` (one state or several) filters, and
        the next page is ``list_jobs(..., page_token=page["next_page_token"])``."""
        params: dict = {"status": [status] if isinstance(status, str) else list(status or ())}
        if limit is not None:
            params["limit"] = int(limit)
        if page_token is not None:
            params["page_token"] = page_token
        return self._request("GET", "/v1/jobs", params=params).json()

    def result(self, job_id: str) -> dict:
        """The Result with numpy arrays (raises ``ServiceError`` if the job failed or is not done)."""
        return self._decode(self._request("GET", f"/v1/jobs/{job_id}/result").json())

    def result_file(self, job_id: str, format: str, field: str = "mean") -> bytes:  # noqa: A002 - the API's name
        """The result's ``field`` (mean, std or samples) as a file: ``format`` nifti (gzipped),
        dicom (a zip), tiff or npy, in the observation's geometry and units."""
        return self._request("GET", f"/v1/jobs/{job_id}/result", params={"format": format, "field": field}).content

    def save_result(self, job_id: str, path, field: str = "mean") -> Path:
        """``result_file`` written to ``path``, in the format its name says."""
        return write_result_file(path, self.result_file(job_id, result_format(path), field))

    def cancel(self, job_id: str) -> dict:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()


#: Statuses after which a job changes no more.
FINAL = ("succeeded", "failed", "cancelled", "expired")


def _check_deadline(job_id: str, end: float | None, timeout: float | None) -> None:
    if end is not None and time.monotonic() > end:
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")


def _error(r: httpx.Response) -> ServiceError:
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except Exception:  # noqa: BLE001
        code, message = "http_error", r.text[:200]
    ra = r.headers.get("Retry-After")
    return ServiceError(r.status_code, code, message, float(ra) if ra else None)
