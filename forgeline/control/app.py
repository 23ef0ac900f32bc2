"""The control-plane application: ``create_control_app()``.

Endpoints (all under ``/v1`` need an API key; see :mod:`forgeline.control.auth`):

====================================================  ==========================  =========================
endpoint                                              what                        role
====================================================  ==========================  =========================
``GET /v1/models``                                    model names                 any key
``GET /v1/models/{name}/versions[/{v}]``              versions, state, decisions  any key
``GET /v1/models/{name}/policy``                      the enforced policy         any key
``GET /v1/models/{name}/versions/{v}/gates?alias=``   dry-run of the gates        any key
``POST /v1/models/{name}/versions/{v}/approvals``     approve / reject            approver
``POST /v1/models/{name}/versions/{v}/promote``       gated alias move            trainer, approver
``POST /v1/models/{name}/aliases/{alias}/rollback``   ungated move back           approver
``GET /v1/models/{name}/history[?alias=]``            audit log of alias moves    any key
====================================================  ==========================  =========================

``admin`` passes every role check. Errors are ``{"error": {"message", "type", "param",
"code"}}`` with the status from ``registry.errors.HTTP_STATUS``; a refused promotion also
carries every gate's verdict in ``error.policy_result``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from forgeline.control.routers import approvals, history, models, promotions, rollback
from registry.client import Registry
from registry.errors import PolicyRefused
from registry.keys import KeyStore
from registry.policy import PolicyBook
from serving.gateway.errors import forgeline_error_body, install_error_handlers

logger = logging.getLogger(__name__)


async def _on_policy_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PolicyRefused)
    body = forgeline_error_body(exc)
    body["error"]["policy_result"] = exc.policy_result
    return JSONResponse(body, status_code=exc.http_status)


def create_control_app(
    *,
    registry: Registry | None = None,
    keys: KeyStore | None = None,
    policies: PolicyBook | None = None,
) -> FastAPI:
    """Build the control-plane app.

    Args:
        registry: the registry to govern; default ``Registry()`` from the environment
            (``MLFLOW_TRACKING_URI``, ``FORGELINE_DB_URL``, ``FORGELINE_WEBHOOK_URLS``).
        keys: the API-key store; default ``KeyStore()`` on the control database.
        policies: promotion policy per model. The server enforces these; callers cannot
            send their own. Default: one approval from an approver for every model.

    Returns:
        The FastAPI app; on shutdown it flushes queued webhook deliveries and closes the
        databases it opened.
    """
    owned = registry is None
    registry = registry or Registry()
    keys = keys or KeyStore(registry.audit.url)
    if policies is None:
        policies = PolicyBook.model_validate({"default": {"approvals": {"count": 1}}})
        logger.info("no policy file given: every promotion needs one approval from an approver")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            registry.close()
            keys.dispose()

    app = FastAPI(
        title="forgeline control plane",
        summary="Models, approvals, promotions, rollback and alias history over MLflow.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.keys = keys
    app.state.policies = policies
    install_error_handlers(app)
    app.add_exception_handler(PolicyRefused, _on_policy_refused)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers (no key needed)."""
        return {"status": "ok"}

    for module in (models, approvals, promotions, rollback, history):
        app.include_router(module.router)
    return app
