"""Slow-loris protection (``service/protocols.py``): a request head must be complete within
``header_timeout_s`` of the connection's opening, or of the first byte of a later request on a
keep-alive connection; the connection limit answers a JSON 503.

Against the real server (``serve()``, ``RECONSERVE_HEADER_TIMEOUT_S=2``), and in-process against a
trivial app for both of uvicorn's HTTP/1.1 implementations (httptools, h11).
"""
import asyncio
import json
import select
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from service.protocols import http_protocol
from tests.helpers.server import free_port, server_log, start_server, stop_server

HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


def drip(sock, first: bytes, rest: bytes, interval: float, give_up: float, while_dripping=None):
    """Send ``first``, then one byte of ``rest`` every ``interval`` s, until the server closes the
    connection (or ``give_up`` s pass). -> (seconds from ``first`` until the close, bytes received)."""
    t0 = time.monotonic()
    sock.sendall(first)
    got, i = b"", 0
    while time.monotonic() - t0 < give_up:
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return time.monotonic() - t0, got
            got += data
            continue
        if while_dripping is not None:
            while_dripping()
            while_dripping = None
        try:
            sock.sendall(rest[i % len(rest):i % len(rest) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, got
        i += 1
    raise AssertionError(f"connection still open after {give_up} s of dripping (received {got!r})")


def read_response(sock, timeout: float = 10.0) -> tuple[int, bytes]:
    """One complete response with a content-length -> (status, body)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, v in (ln.split(":", 1) for ln in lines[1:]) if k.strip().lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


def assert_408(got: bytes):
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


# ----------------------------------------------------------------------------- the real server
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server():
    proc, url = start_server({"RECONSERVE_HEADER_TIMEOUT_S": TIMEOUT})
    try:
        yield proc, url
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_real_server_closes_a_dripping_head_and_serves_others_meanwhile(server):
    proc, url = server
    port = int(url.rsplit(":", 1)[1])
    others = []

    def normal_request():
        t = time.monotonic()
        r = httpx.get(url + "/healthz", timeout=5)
        others.append((r.status_code, time.monotonic() - t))

    with socket.create_connection(("127.0.0.1", port)) as sock:
        took, got = drip(sock, b"GET /healthz HTTP/1.1\r\nHo", b"st: example\r\nX-Pad: aaaaaaaaaa\r\n",
                         interval=1.0, give_up=TIMEOUT + 4, while_dripping=normal_request)
    assert TIMEOUT - 0.5 < took < TIMEOUT + 1.5, (took, server_log(proc)[-2000:])
    assert_408(got)
    assert others and others[0][0] == 200 and others[0][1] < 1.0, others


@pytest.mark.slow
def test_real_server_keep_alive_client_makes_two_requests(server):
    """The deadline of the connection's opening ends with the first head: a second request
    after more than ``header_timeout_s`` of idling (within keep-alive) is still served."""
    _, url = server
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        assert read_response_after(sock, HEAD)[0] == 200
        time.sleep(TIMEOUT + 0.3)
        assert read_response_after(sock, HEAD)[0] == 200
    with httpx.Client(base_url=url, timeout=5) as c:  # an ordinary keep-alive client
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").status_code == 200


def read_response_after(sock, data: bytes):
    sock.sendall(data)
    return read_response(sock)


# ----------------------------------------------------------------------------- both implementations
FAST = 0.6


async def tiny_app(scope, receive, send):
    """``ok`` to everything; reads the body first; ``/slow`` answers after ``FAST + 0.3`` s."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(FAST + 0.3)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module", params=["httptools", "h11"])
def tiny_server(request):
    port = free_port()
    config = uvicorn.Config(tiny_app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            http=http_protocol(FAST, request.param), timeout_keep_alive=5, limit_concurrency=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers off the main thread
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield port, request.param
    server.should_exit = True
    thread.join(10)


def test_protocol_classes(tiny_server):
    port, kind = tiny_server
    cls = http_protocol(FAST, kind)
    assert cls.header_timeout_s == FAST and http_protocol(FAST, kind) is cls
    assert any(b.__name__ == {"httptools": "HttpToolsProtocol", "h11": "H11Protocol"}[kind] for b in cls.__mro__)
    with pytest.raises(ValueError):
        http_protocol(0)
    with pytest.raises(ValueError):
        http_protocol(1.0, "zttp")


def test_dripped_first_head_gets_408_and_close(tiny_server):
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        took, got = drip(sock, b"GET / HTTP/1.1\r\nHo", b"st: x\r\nX-Pad: aaaa\r\n", interval=0.25, give_up=FAST + 3)
    assert FAST - 0.2 < took < FAST + 1.0
    assert_408(got)


def test_silent_connection_is_closed_without_a_response(tiny_server):
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.monotonic()
        sock.settimeout(FAST + 3)
        assert sock.recv(100) == b""
        assert FAST - 0.2 < time.monotonic() - t0 < FAST + 1.0


def test_keep_alive_deadline_runs_from_the_next_heads_first_byte(tiny_server):
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert read_response_after(sock, HEAD) == (200, b"ok")
        time.sleep(FAST + 0.2)  # idle (keep-alive is 5 s): no deadline runs between requests
        assert read_response_after(sock, HEAD) == (200, b"ok")
        time.sleep(0.1)
        took, got = drip(sock, b"G", b"ET / HTTP/1.1\r\n", interval=0.25, give_up=FAST + 3)
    assert FAST - 0.2 < took < FAST + 1.0
    assert_408(got)


def test_a_slow_body_or_a_slow_answer_is_not_cut(tiny_server):
    """The deadline covers the head only: a body dripped after it (the app's own body timeout
    covers that) and an answer that takes longer than the deadline are left alone."""
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n\r\n")
        for b in b"abcd":
            time.sleep(0.2)
            sock.sendall(bytes([b]))
        assert read_response(sock) == (200, b"ok")


def test_a_pipelined_request_is_not_cut(tiny_server):
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(HEAD + HEAD)
        sock.settimeout(5)
        got = b""
        while got.count(b"HTTP/1.1 200 OK\r\n") < 2 or not got.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk


def test_connection_limit_answers_json_503(tiny_server):
    port, _ = tiny_server
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as sock:  # the third of limit 3
            sock.sendall(HEAD)
            sock.settimeout(5)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert read_response_after(sock, HEAD) == (200, b"ok")


def test_reconserve_server_begins_the_apps_shutdown_on_the_first_signal():
    import signal
    from types import SimpleNamespace

    from service.server import ReconserveServer

    calls = []
    app = SimpleNamespace(state=SimpleNamespace(reconserve=SimpleNamespace(begin_shutdown=lambda: calls.append(1))))
    server = ReconserveServer(uvicorn.Config(app, lifespan="off"))
    server.handle_exit(signal.SIGTERM, None)
    assert calls == [1] and server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)  # a second Ctrl+C forces the exit; begun once only
    assert calls == [1] and server.force_exit

    def broken():
        raise RuntimeError("boom")

    app.state.reconserve.begin_shutdown = broken  # a failing begin_shutdown still stops the server
    server = ReconserveServer(uvicorn.Config(app, lifespan="off"))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    server = ReconserveServer(uvicorn.Config(SimpleNamespace(), lifespan="off"))  # an app without it
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
