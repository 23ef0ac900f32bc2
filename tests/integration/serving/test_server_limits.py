"""The HTTP server's own limits, on a real uvicorn with raw sockets: trickled or missing
headers, a stalled body and too many connections are closed; normal clients still get
answers meanwhile; SIGTERM mid-upload exits within the graceful-shutdown bound."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from serving.config import ServerLimits
from serving.gateway.server import serve_in_background
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


def _status(url: str) -> int:
    return httpx.get(url, timeout=5).status_code


@pytest.fixture
def server() -> Iterator[tuple[str, int, ServerLimits]]:
    limits = ServerLimits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0, max_connections=64)
    url, stop = serve_in_background(_app(), limits=limits)
    port = int(url.rsplit(":", 1)[1])
    try:
        yield url, port, limits
    finally:
        stop()


def _closed(sock: socket.socket) -> bool:
    """True when the server closed ``sock`` (EOF, possibly after a 408), False while it is open."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_trickling_headers_are_closed_within_the_header_timeout_while_others_are_served(server) -> None:
    url, port, limits = server
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    start = time.monotonic()
    sent = 0
    closed_at: dict[int, float] = {}
    served = []
    while len(closed_at) < len(socks) and time.monotonic() - start < limits.header_timeout_s * 6:
        for i, sock in enumerate(socks):
            if i in closed_at:
                continue
            try:
                sock.send(request[sent : sent + 1])  # one byte at a time: the headers never complete in time
            except OSError:
                closed_at[i] = time.monotonic() - start
                continue
            if _closed(sock):
                closed_at[i] = time.monotonic() - start
        sent += 1
        served.append(httpx.get(url + "/health", timeout=5).status_code)
        time.sleep(0.1)
    for sock in socks:
        sock.close()
    assert len(closed_at) == 40, f"{40 - len(closed_at)} trickling connection(s) still open"
    assert max(closed_at.values()) < limits.header_timeout_s * 3, closed_at
    assert served and set(served) == {200}


def test_a_silent_connection_and_a_stalled_body_are_closed(server) -> None:
    _, port, limits = server
    silent = socket.create_connection(("127.0.0.1", port))
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    # Closed by the timeouts (1 s), well before anything else would close them; the bound is
    # loose because a loaded machine runs the server's timers late.
    wait_for("the silent connection closed", lambda: _closed(silent), limits.body_timeout_s * 8, every_s=0.05)
    wait_for("the stalled body's connection closed", lambda: _closed(stalled), limits.body_timeout_s * 8, every_s=0.05)


def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    limits = ServerLimits(max_connections=5, header_timeout_s=30)
    url, stop = serve_in_background(_app(), limits=limits)
    port = int(url.rsplit(":", 1)[1])
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        closed: set[int] = set()

        def enough_closed() -> bool:
            closed.update(i for i, s in enumerate(socks) if i not in closed and _closed(s))
            return len(closed) >= 12 - 5

        wait_for("7 of 12 connections closed with a cap of 5", enough_closed, timeout_s=10, every_s=0.05)
        for s in socks:
            s.close()
        wait_for("the cap to free up again", lambda: _status(url + "/health") == 200, timeout_s=10, every_s=0.05)
    finally:
        stop()


def test_a_request_over_the_concurrency_limit_gets_an_openai_shaped_503() -> None:
    limits = ServerLimits(max_connections=3, header_timeout_s=30)
    url, stop = serve_in_background(_app(), limits=limits)
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        answers: list[httpx.Response] = []

        def refused() -> bool:  # the third connection, once the server has accepted the two idle ones
            answers.append(httpx.get(url + "/health", timeout=5))
            return answers[-1].status_code == 503

        wait_for("a 503 at the connection limit", refused, timeout_s=10, every_s=0.05)
        busy = answers[-1]
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "unavailable" and busy.json()["error"]["type"]
        for s in idle:
            s.close()
        wait_for("the cap to free up again", lambda: _status(url + "/health") == 200, timeout_s=10, every_s=0.05)
    finally:
        stop()


def test_sigterm_mid_upload_exits_within_the_graceful_shutdown_bound() -> None:
    from registry.keys import KeyStore

    keys = KeyStore()  # the control database under this test's $FORGELINE_HOME
    secret = keys.create("uploader", roles=("trainer",))[0]
    keys.dispose()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grace = 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeline", "control", "serve", "--port", str(port), "--no-supervise",
         "--graceful-shutdown", str(grace), "--body-timeout", "600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "control plane did not start"
            time.sleep(0.3)
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
            + b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n' + b'{"messages": []}\n' * 500
        )
        time.sleep(1.0)  # the upload is being read and stays so: the client sends nothing more
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 20)
        took = time.monotonic() - start
        upload.close()
        # It waited for the upload (a running request), then stopped it at the bound.
        assert grace - 0.5 < took < grace + 5, f"exited {took:.1f} s after SIGTERM with a {grace} s grace period"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_oversized_headers_are_refused_on_both_http_parsers(http_impl: str) -> None:
    limits = ServerLimits(max_header_bytes=4096)
    url, stop = serve_in_background(_app(), limits=limits, http_impl=http_impl)
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.split(b"\r\n")[0].split(b" ")[1] in (b"431", b"400"), answer[:80]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # others are still served
    finally:
        stop()


def _echo_headers_app() -> FastAPI:
    app = FastAPI()

    @app.post("/headers")
    async def headers(request: Request) -> dict[str, object]:
        body = await request.body()
        return {"headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]], "bytes": len(body)}

    return app


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_request_header_names_reach_the_app_lowercased_and_expect_100_continue_is_honoured(http_impl: str) -> None:
    url, stop = serve_in_background(_echo_headers_app(), http_impl=http_impl)
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /headers HTTP/1.1\r\nHost: x\r\nX-Request-ID: MixedCase-Value\r\nContent-Type: text/plain\r\n"
                b"EXPECT: 100-Continue\r\nContent-Length: 3\r\n\r\n"
            )
            interim = sock.recv(4096)
            assert interim.startswith(b"HTTP/1.1 100 "), interim[:80]  # sent before the app reads the body
            sock.sendall(b"abc")
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
        seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert seen["bytes"] == 3
        assert ["x-request-id", "MixedCase-Value"] in seen["headers"]
        assert ["expect", "100-Continue"] in seen["headers"]
        assert [name for name, _ in seen["headers"]] == [
            "host",
            "x-request-id",
            "content-type",
            "expect",
            "content-length",
        ]
    finally:
        stop()
