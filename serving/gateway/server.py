"""Run the gateway (or the control plane) with uvicorn, in the foreground or on a background thread.

Both apply the same `ServerLimits`: header/body read timeouts, keep-alive timeout, a
connection cap, a header size limit and a bounded graceful shutdown. They run on uvloop
and httptools when installed (``uvicorn[standard]``), and without uvicorn's own access
log: the gateway writes one JSON line per request itself (`serving.gateway.metrics`).

`run_server` with ``workers > 1`` starts that many processes on one listening socket
(uvicorn's supervisor); each builds its app from an import string, so the app must be
reproducible from the environment (``forgeline serve`` passes its options that way).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from registry.errors import ErrorCode, ForgelineError
from serving.config import ServerLimits
from serving.gateway.connections import limited_protocol
from serving.gateway.metrics import MULTIPROC_ENV
from serving.startup_heap import freeze_startup_heap

logger = logging.getLogger(__name__)

__all__ = ["GatewayConfig", "ServerLimits", "run_server", "serve_in_background", "server_config"]


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration with our limited HTTP protocol, built where the config is
    loaded: worker processes receive the config pickled, and a class made at run time
    does not pickle."""

    def __init__(
        self,
        app: Any,
        *,
        server_limits: ServerLimits,
        http_impl: str | None = None,
        freeze_heap: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(app, **options)
        self.server_limits = server_limits
        self.http_impl = http_impl  # None: httptools when installed, else h11
        self.freeze_heap = freeze_heap  # only a process that owns its server (`serving.startup_heap`)

    def load(self) -> None:
        super().load()
        self.http_protocol_class = limited_protocol(self.server_limits, self.http_impl)
        if self.freeze_heap:
            self.lifespan_class = _freezing_after_startup(self.lifespan_class)


def _freezing_after_startup(lifespan_class: Any) -> Callable[[uvicorn.Config], Any]:
    """``lifespan_class`` whose start-up, once it succeeded (models loaded), freezes the heap."""

    def make(config: uvicorn.Config) -> Any:
        lifespan = lifespan_class(config)
        startup = lifespan.startup

        async def startup_then_freeze() -> None:
            await startup()
            if not lifespan.should_exit:
                freeze_startup_heap()

        lifespan.startup = startup_then_freeze
        return lifespan

    return make


def server_config(app: FastAPI | str, limits: ServerLimits | None = None, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with ``limits`` applied (``options``: host, port, log_level...).

    ``app`` may be an import string (``module:factory`` with ``factory=True``), as worker
    processes need.
    """
    limits = limits or ServerLimits()
    options.setdefault("access_log", False)  # ours is the one access log (a JSON line per request)
    return GatewayConfig(
        app,
        server_limits=limits,
        timeout_keep_alive=int(max(1, round(limits.keep_alive_s))),
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=int(max(1, round(limits.graceful_shutdown_s))),
        **options,
    )


class _HeldStartupErrors(logging.Filter):
    """Holds back uvicorn's error records until the server has started.

    A failed start-up would otherwise print the lifespan's whole traceback; `run_server`
    raises the failure as one `ForgelineError` instead.
    """

    def __init__(self, server: uvicorn.Server) -> None:
        super().__init__()
        self.server = server
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.server.started or record.levelno < logging.ERROR:
            return True
        self.held.append(record)
        return False


def run_server(
    app: FastAPI | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    limits: ServerLimits | None = None,
    workers: int = 1,
) -> None:
    """Serve ``app`` until interrupted (Ctrl-C or SIGTERM: running requests get ``limits.graceful_shutdown_s``).

    Args:
        app: the app, or with ``workers > 1`` an import string of a factory that builds it
            (``package.module:function``) in each worker process.
        workers: processes sharing the listening socket; the kernel spreads connections.

    Raises:
        ForgelineError: the gateway did not start: a model failed to load (the lifespan's
            own error, e.g. ``model_not_found``), or the address could not be bound.
    """
    if workers > 1:
        if not isinstance(app, str):
            raise ValueError("several worker processes need the app as an import string of its factory")
        _run_processes(app, host, port, log_level=log_level, limits=limits, workers=workers)
        return
    if isinstance(app, str):
        from uvicorn.importer import import_from_string

        app = import_from_string(app)()
    config = server_config(app, limits, host=host, port=port, log_level=log_level, lifespan="on", freeze_heap=True)
    server = uvicorn.Server(config)
    held = _HeldStartupErrors(server)
    uvicorn_log = logging.getLogger("uvicorn.error")  # configured by uvicorn.Config above
    uvicorn_log.addFilter(held)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits the process when it cannot bind; a start-up error is ours to report.
        if server.started:
            raise
    finally:
        uvicorn_log.removeFilter(held)
    if not server.started:
        raise startup_error(app, held.held)


def _run_processes(factory: str, host: str, port: int, *, log_level: str, limits: ServerLimits | None, workers: int) -> None:
    from uvicorn.supervisors import Multiprocess

    config = server_config(
        factory, limits, host=host, port=port, log_level=log_level, lifespan="on", factory=True, workers=workers,
        freeze_heap=True,
    )
    # prometheus_client's multiprocess mode: each process keeps its counters in files here, and
    # /metrics, whichever process answers it, sums them all. Set before the processes start
    # (they import prometheus_client afresh); an operator's own directory is kept.
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="forgeline-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
        if own_dir is not None:
            del os.environ[MULTIPROC_ENV]
            shutil.rmtree(own_dir, ignore_errors=True)


def startup_error(app: FastAPI, records: list[logging.LogRecord]) -> ForgelineError:
    """One error for a server that did not start: what its lifespan raised, else uvicorn's first error."""
    exc = getattr(app.state, "startup_error", None)
    if isinstance(exc, ForgelineError):
        return exc
    if exc is not None:
        first = (str(exc).strip().splitlines() or [""])[0]
        return ForgelineError(f"the server could not start: {type(exc).__name__}: {first}", code=ErrorCode.UNAVAILABLE)
    for record in records:
        lines = [line for line in record.getMessage().strip().splitlines() if line.strip()]
        if lines:
            # A traceback's last line names the exception; anything else is one message.
            line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
            return ForgelineError(f"the server could not start: {line.strip()}", code=ErrorCode.UNAVAILABLE)
    return ForgelineError("the server could not start; rerun with --debug for details", code=ErrorCode.UNAVAILABLE)


def serve_in_background(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    timeout_s: float = 120.0,
    log_level: str = "warning",
    limits: ServerLimits | None = None,
    http_impl: str | None = None,
) -> tuple[str, Callable[[], None]]:
    """Start uvicorn on a thread and wait until it accepts connections.

    Args:
        app: the ASGI app; its lifespan (engine start) completes before this returns.
        host: interface to bind.
        port: port to bind; 0 picks a free one.
        timeout_s: how long to wait for startup.
        limits: the server's limits (default `ServerLimits()`).
        http_impl: ``h11`` or ``httptools`` (default: httptools when installed).

    Returns:
        ``(base_url, stop)``: e.g. ``http://127.0.0.1:43117`` and a function that shuts the
        server down (running the lifespan shutdown) and waits for the thread.

    Raises:
        RuntimeError: the server did not start (lifespan failure, port taken) in time.
    """
    # Bind here so port 0 is resolved before uvicorn starts, and nobody can take it meanwhile.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = server_config(app, limits, log_level=log_level, lifespan="on", http_impl=http_impl)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="forgeline-gateway", daemon=True)
    thread.start()

    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the gateway failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
            raise RuntimeError(f"the gateway did not start within {timeout_s:.0f} s")
        time.sleep(0.02)
    url_host = f"[{host}]" if ":" in host else host
    with socket.create_connection((host, bound_port), timeout=5):
        pass  # started means listening; this confirms the socket accepts connections

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    base_url = f"http://{url_host}:{bound_port}"
    logger.info("gateway listening on %s", base_url)
    return base_url, stop
