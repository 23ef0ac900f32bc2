"""`GatewayApp`: the gateway's FastAPI app, whose HTTP requests skip FastAPI's no-op layers.

FastAPI (0.165) puts three layers of its own in front of every request besides the
server-error one: its native OpenTelemetry check (three global-provider lookups and the
``os.environ`` reads behind them, ~22 Python calls per request), ExceptionTelemetry (it
records an exception only for a request FastAPI's telemetry observes) and AppBodyLimit (it
acts only with ``max_body_size``, which the gateway does not set: `AccessLogMiddleware`
bounds bodies). Each layer is also resumed at every wait of the request (BENCHMARKS.md §1,
eighth pass).

Whether FastAPI's telemetry is on is decided once, when the app has started (FastAPI's own
start-up has configured its providers from the environment by then): on when the operator
configured a tracer, meter or logger provider, globally or through ``telemetry=``. When it
is off, the three layers do nothing for any request, and `GatewayApp` hands HTTP requests
straight to the server-error layer around the gateway's own middleware. When it is on,
every request goes the whole way, and FastAPI's spans, metrics and logs are as before.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

try:  # FastAPI's native telemetry and app body limit (0.165); older versions have neither layer
    from fastapi._body_limit import AppBodyLimitMiddleware
    from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
except ImportError:  # pragma: no cover - then every request takes FastAPI's own path
    AppBodyLimitMiddleware = ExceptionTelemetryMiddleware = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)


class GatewayApp(FastAPI):
    """A FastAPI app that, once started without FastAPI's telemetry, skips its no-op layers."""

    _entry: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = self._entry
        if entry is not None and scope["type"] == "http":
            scope["app"] = self  # as Starlette's own entry sets it (handlers read app.state)
            await entry(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def skip_noop_layers(self) -> bool:
        """Decide, once the app has started, whether HTTP requests skip FastAPI's no-op layers.

        Returns:
            True when they do from now on; False when every request keeps FastAPI's whole
            path (its telemetry is on, a body limit or root path is set, the app has not
            been started, or the middleware stack is not the one this knows).
        """
        self._entry = None
        stack = self.middleware_stack
        if (
            ExceptionTelemetryMiddleware is None
            or stack is None
            or self.root_path
            or self.max_body_size is not None
            or self._native_telemetry.enabled()
        ):
            return False
        if not (
            isinstance(stack, ServerErrorMiddleware)
            and isinstance(stack.app, ExceptionTelemetryMiddleware)
            and isinstance(stack.app.app, AppBodyLimitMiddleware)
        ):
            logger.info("FastAPI's middleware stack is not the expected one; requests take its whole path")
            return False
        # Below the skipped two: the gateway's own layers, behind the same server-error handling.
        self._entry = ServerErrorMiddleware(stack.app.app.app, handler=stack.handler, debug=stack.debug)
        return True
