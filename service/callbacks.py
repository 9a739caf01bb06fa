"""Callbacks (docs/API.md "Callbacks"): a job that names ``"callback": {"url": ...}`` has its final
``JobStatus`` POSTed there when it ends, signed, retried with exponential backoff, durably.

The delivery lives in the job's row of the store: ``jobs.callback`` holds what ``JobStatus.callback``
shows (url, state, attempts, last status, error), ``jobs.callback_due`` the wall-clock time the
next attempt is due (NULL when none is). A delivery pending when the process stops goes on at the
next start. Every attempt is first claimed in the store (``JobStore.claim_callback`` moves its due
time past the attempt's longest duration), so among the processes that share a store (a cluster's
worker replicas, each running ``Deliveries``) at most one POST is in flight per attempt.

Targets: ``http``/``https`` only; loopback, private, link-local, unspecified, multicast and other
non-public addresses are refused unless ``RECONSERVE_CALLBACK_ALLOW_PRIVATE`` is set: an IP literal
(or ``localhost``) at admission, and at every attempt the addresses the name resolves to, the POST
going to the address checked (no second lookup: DNS rebinding cannot swap it).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx

from .errors import ApiError

log = logging.getLogger("reconserve.callbacks")

SIGNATURE_HEADER = "X-Reconserve-Signature"
SECRET_FILE = "callback_secret"  # in the data dir, mode 0600, when RECONSERVE_CALLBACK_SECRET is unset
MAX_URL = 2048
POLL_S = 1.0  # how often the store is asked for due deliveries (finishes here wake it at once)
SEND = ('send "callback": {"url": "https://host/path"} (an http or https URL of a server that takes '
        'a POST of the job\'s final JobStatus; docs/API.md "Callbacks")')


# ----------------------------------------------------------------------------- admission
def _invalid(what: str) -> ApiError:
    return ApiError(422, "invalid_callback", f"callback: {what}; {SEND}")


def parse_callback(value) -> dict | None:
    """The request's ``callback`` block checked for form (the schema's validator): ``{"url": ...}``
    with an http(s) URL that has a host and no user:password; 422 ``invalid_callback`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"url"} or not isinstance(value["url"], str):
        raise _invalid("expected an object with one field, url (a string)")
    url = value["url"]
    if len(url) > MAX_URL:
        raise _invalid(f"the url is longer than {MAX_URL} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise _invalid("the url is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _invalid("the url must be http:// or https:// with a host")
    if parsed.userinfo:
        raise _invalid("the url must not carry user:password@ (the signature authenticates the server)")
    return {"url": url}


def refused_reason(address: str) -> str | None:
    """Why an IP address is not a callback target by default (None: a public address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name in ("unspecified", "loopback", "link_local", "private", "multicast"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return None if ip.is_global else "reserved"


def check_target(callback: dict | None, allow_private: bool) -> None:
    """Admission: 422 ``invalid_callback`` for a loopback or private IP literal (or ``localhost``)
    unless ``allow_private``. Names are checked at delivery, on the addresses they resolve to."""
    if callback is None or allow_private:
        return
    host = httpx.URL(callback["url"]).host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        reason = "loopback"
    else:
        try:
            reason = refused_reason(host)
        except ValueError:  # a name, not an address
            return
    if reason is not None:
        raise ApiError(422, "invalid_callback", f"callback: the url's host is a {reason} address, which this "
                       "server does not call (its setting RECONSERVE_CALLBACK_ALLOW_PRIVATE is off); send a "
                       "public http(s) URL")


# ----------------------------------------------------------------------------- signing
def callback_secret(settings) -> bytes:
    """``RECONSERVE_CALLBACK_SECRET`` (when not empty), else a random secret kept in ``<data_dir>/callback_secret``
    (created once, mode 0600; every process on that data dir signs with it)."""
    given = settings.callback_secret.get_secret_value() if settings.callback_secret is not None else ""
    if given:
        return given.encode()
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():  # written aside, then linked into place: never seen empty, one writer wins
        tmp = path.with_name(f"{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def signature(secret: bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def initial_state(callback: dict | None) -> dict | None:
    """``JobStatus.callback`` of a job before its delivery (None: the job has no callback)."""
    if callback is None:
        return None
    return {"url": callback["url"], "state": "pending", "attempts": 0, "last_status": None,
            "delivered_at": None, "error": None}


def pending(state: dict | None) -> bool:
    return state is not None and state.get("state") == "pending"


def payload(status: dict) -> bytes:
    """The POSTed body: the final JobStatus without its ``callback`` (the same bytes every attempt)."""
    return json.dumps({k: v for k, v in status.items() if k != "callback"}, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- one attempt
class Refused(Exception):
    """The target resolves to an address this server does not call: the delivery fails."""


def resolve(url: httpx.URL, allow_private: bool) -> list[str]:
    """The addresses to POST to, in the resolver's order, every one checked unless
    ``allow_private`` (``Refused``; ``OSError`` when the name does not resolve: retried)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    infos = socket.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"{url.host} has no address")
    for a in addresses if not allow_private else ():
        reason = refused_reason(a)
        if reason is not None:
            raise Refused(f"the url's host resolves to a {reason} address, which this server does not call "
                          "(RECONSERVE_CALLBACK_ALLOW_PRIVATE is off)")
    return addresses


def outcome(status: int | None, error: str | None) -> str:
    """``delivered``, ``retry`` (5xx, 408, 429, timeouts, connection errors) or ``failed``."""
    if status is None:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "retry" if status >= 500 or status in (408, 429) else "failed"


def backoff_s(base_s: float, attempts: int) -> float:
    """Wait after the ``attempts``-th failed attempt: base, 2 base, 4 base, ... (at most an hour)."""
    return min(base_s * 2.0 ** (attempts - 1), 3600.0)


# ----------------------------------------------------------------------------- the delivery thread
class Deliveries:
    """One process's delivery thread: it asks the store for due deliveries (at once when a job of
    this process finishes, ``wake``; else every ``POLL_S`` s), claims each attempt, POSTs and
    records the outcome. Never on the worker's thread; an attempt lasts at most about three
    ``callback_timeout_s`` (connect, send, first byte of the answer; its body is not read).

    ``status_of(record)``: the job's ``JobStatus`` dict; ``now_iso()``: the time as JobStatus
    writes it; ``stopping()``: True once the process shuts down."""

    def __init__(self, settings, store, status_of, now_iso, stopping):
        self.settings, self.store = settings, store
        self.status_of, self.now_iso, self.stopping = status_of, now_iso, stopping
        self.thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._secret = b""
        self._soonest = float("inf")  # the earliest retry this process scheduled

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self._secret = callback_secret(self.settings)
        self.thread = threading.Thread(target=self._loop, name="reconserve-callbacks", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        timeout = httpx.Timeout(self.settings.callback_timeout_s)
        # no proxies from the environment; no kept-alive connections (one per address, whatever the SNI)
        with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self.stopping():
                self._wake.clear()
                try:
                    self._round(client)
                except Exception:  # noqa: BLE001 - the store may be briefly unreachable: next round
                    log.exception("callback deliveries failed; retrying")
                self._wake.wait(min(POLL_S, max(0.0, self._soonest - time.time())))

    def _round(self, client: httpx.Client) -> None:
        """Every delivery due now, one attempt each."""
        self._soonest = float("inf")
        for job_id in self.store.due_callbacks(time.time()):
            if self.stopping():
                return
            self._attempt(client, job_id)

    def _attempt(self, client: httpx.Client, job_id: str) -> None:
        """Claim the attempt, log it in the job's status, POST, record the outcome."""
        hold = 3 * self.settings.callback_timeout_s + 10.0  # past the attempt's longest duration
        rec = self.store.claim_callback(job_id, time.time(), hold)
        if rec is None or not pending(rec.callback):  # another process took it
            return
        state = dict(rec.callback, attempts=int(rec.callback["attempts"]) + 1)
        self.store.update(job_id, callback=state)
        body = payload(self.status_of(rec))
        try:
            status, error = self._post(client, state["url"], body, job_id, state["attempts"])
            verdict = outcome(status, error)
        except Refused as e:
            status, error, verdict = None, str(e), "failed"
        except Exception as e:  # noqa: BLE001 - unforeseen: counted as a failed attempt, never stuck
            log.exception("job %s: callback attempt failed unexpectedly", job_id)
            status, error, verdict = None, f"the attempt failed ({e.__class__.__name__})", "retry"
        self._record(job_id, state, status, error, verdict)

    def _post(self, client: httpx.Client, url_text: str, body: bytes, job_id: str,
              attempt: int) -> tuple[int | None, str | None]:
        """One POST, to the first checked address that takes a connection -> ``(HTTP status or
        None, error or None)``."""
        url = httpx.URL(url_text)
        try:
            addresses = resolve(url, self.settings.callback_allow_private)
        except OSError as e:
            return None, f"the url's host did not resolve ({e.__class__.__name__})"
        headers = {"Content-Type": "application/json", "Host": url.netloc.decode("ascii"),
                   SIGNATURE_HEADER: signature(self._secret, body), "X-Reconserve-Job": job_id,
                   "X-Reconserve-Attempt": str(attempt), "User-Agent": "reconserve-callbacks"}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        error = None
        for address in addresses:  # (the name is not looked up again: the address checked is called)
            try:
                with client.stream("POST", url.copy_with(host=address), content=body, headers=headers,
                                   extensions=extensions) as r:
                    status = r.status_code
                break
            except httpx.ConnectError as e:  # (nothing was sent: the next address)
                error = f"the connection failed ({e.__class__.__name__})"
            except httpx.TimeoutException:
                return None, f"no answer within {self.settings.callback_timeout_s:g} s"
            except httpx.HTTPError as e:
                return None, f"the connection failed ({e.__class__.__name__})"
        else:
            return None, error
        if 200 <= status < 300:
            return status, None
        hint = " (redirects are not followed: send the final URL)" if 300 <= status < 400 else ""
        return status, f"the target answered HTTP {status}{hint}"

    def _record(self, job_id: str, state: dict, status: int | None, error: str | None, verdict: str) -> None:
        """The attempt's outcome in the job's row: delivered, failed, or the next attempt's due time."""
        s = self.settings
        state = dict(state, last_status=status, error=error)
        due = None
        if verdict == "delivered":
            state.update(state="delivered", delivered_at=self.now_iso())
        elif verdict == "retry" and state["attempts"] < s.callback_attempts:
            due = time.time() + backoff_s(s.callback_base_delay_s, state["attempts"])
            self._soonest = min(self._soonest, due)
        else:
            gave_up = f"; gave up after {state['attempts']} attempts" if verdict == "retry" else ""
            state.update(state="failed", error=f"{error}{gave_up}")
        self.store.update(job_id, callback=state, callback_due=due)
        log.info("job %s: callback attempt %d to %s: %s", job_id, state["attempts"],
                 httpx.URL(state["url"]).host, status if status is not None else error)
