"""The control-plane application: ``create_control_app()``.

Endpoints (all under ``/v1`` need an API key of the owning org; see :mod:`forgeline.control.auth`):

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
``POST /v1/files``                                    upload fine-tuning JSONL    trainer
``GET /v1/files[?after=&limit=&order=&purpose=]``     the org's files             any key
``GET /v1/files/{file_id}[/content]``                 metadata / raw bytes        any key
``DELETE /v1/files/{file_id}``                        delete a file               trainer
``POST /v1/fine_tuning/jobs``                         queue a fine-tuning job     trainer
``GET /v1/fine_tuning/jobs[/{id}]``                   the org's jobs / one job    any key
``POST /v1/fine_tuning/jobs/{id}/cancel|pause|resume`` stop / hold / continue     trainer
``GET /v1/fine_tuning/jobs/{id}/events|checkpoints``  progress, checkpoints       any key
``/console``                                          the approver's web console  a key, once, at login
====================================================  ==========================  =========================

``admin`` passes every role check. Every ``{name}`` route is org-walled: a model owned by
another organisation (its versions' ``forgeline.org`` tag; untagged models are the
operator's ``default`` org's) answers 404 exactly as a missing one; files and jobs are the
caller's org's only. The table in :data:`forgeline.control.auth.ROUTES` is what is
enforced; this one is its summary. Errors are ``{"error": {"message", "type", "param",
"code"}}`` with the status from ``registry.errors.HTTP_STATUS``; a refused promotion also
carries every gate's verdict in ``error.policy_result``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from forgeline.control import console
from forgeline.control.auth import authorize, check_declared
from forgeline.control.limits import UploadLimitMiddleware
from forgeline.control.routers import approvals, history, models, promotions, rollback
from forgeline.control.routers import files as files_api
from forgeline.control.routers import fine_tuning as fine_tuning_api
from forgeline.finetune.base_models import BaseModelStore
from forgeline.finetune.files import FileStore
from forgeline.finetune.jobs import FineTuningStore
from forgeline.finetune.service import FineTuning, FineTuningSettings
from forgeline.finetune.supervisor import Supervisor
from jobs.store import JobStore
from registry import legacy_orgs
from registry.client import Registry
from registry.errors import PolicyRefused
from registry.keys import KeyStore
from registry.policy import PolicyBook
from serving.gateway.errors import document_errors, forgeline_error_body, install_error_handlers
from serving.gateway.json_body import MAX_JSON_DEPTH, StrictJSONMiddleware

logger = logging.getLogger(__name__)

MAX_JSON_BODY_BYTES = 1024 * 1024
"""Largest JSON request body (decisions, promotions, job specs are a few KB; uploads are multipart)."""


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
    files: FileStore | None = None,
    fine_tuning: FineTuningSettings | None = None,
    supervise: bool = True,
) -> FastAPI:
    """Build the control-plane app.

    Args:
        registry: the registry to govern; default ``Registry()`` from the environment
            (``MLFLOW_TRACKING_URI``, ``FORGELINE_DB_URL``, ``FORGELINE_WEBHOOK_URLS``).
        keys: the API-key store; default ``KeyStore()`` on the control database.
        policies: promotion policy per model. The server enforces these; callers cannot
            send their own. Default: one approval from an approver for every model and alias
            but `candidate` (no approval: where fine-tuning jobs put their new versions).
        files: the fine-tuning file store; default ``FileStore()`` on the control database
            with blobs under ``$FORGELINE_HOME/files``.
        fine_tuning: where and how customers' fine-tuning jobs run; default: on this
            machine, one process each (`FineTuningSettings`).
        supervise: run the background supervisor that submits and follows fine-tuning
            jobs (one per control database; replicas behind a load balancer set False).

    Returns:
        The FastAPI app; on shutdown it flushes queued webhook deliveries and closes the
        databases it opened.
    """
    owned = registry is None
    registry = registry or Registry()
    keys = keys or KeyStore(registry.audit.url)
    owns_files = files is None
    files = files or FileStore(registry.audit.url)
    if policies is None:
        # `candidate` needs no approval: a fine-tuning job's owner can try the new version at once.
        policies = PolicyBook.model_validate(
            {"default": {"approvals": {"count": 1}, "requires": {"candidate": {"approvals": 0}}}}
        )
        logger.info("no policy file given: every promotion but to `candidate` needs one approval from an approver")
    url = registry.audit.url
    ft = FineTuning(
        store=FineTuningStore(url),
        files=files,
        bases=BaseModelStore(url),
        launches=JobStore(url),
        registry=registry,
        policies=policies,
        settings=(fine_tuning or FineTuningSettings()).checked(),
    )
    supervisor = Supervisor(ft) if supervise else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # rows from before 0004 (org) or 0006 (registration) count for nobody until claimed (registry.legacy_orgs)
            legacy_orgs.claim(registry)
        except Exception:
            logger.warning("could not claim legacy approval and audit rows; they count for nobody", exc_info=True)
        if supervisor is not None:
            supervisor.start()
        yield
        if supervisor is not None:
            supervisor.stop()
        ft.store.dispose()
        ft.bases.dispose()
        if owned:
            registry.close()
            keys.dispose()
        if owns_files:
            files.dispose()

    app = FastAPI(
        title="forgeline control plane",
        summary="Models, approvals, promotions, rollback and alias history over MLflow.",
        description=(
            "Every `/v1` route needs `Authorization: Bearer <key>` (401 otherwise; 403 without the role or model "
            f"scope). Limits: JSON bodies up to {MAX_JSON_BODY_BYTES} bytes and uploads up to the file store's limit "
            f"(413 beyond); JSON must be UTF-8 without unpaired UTF-16 surrogates, nested at most {MAX_JSON_DEPTH} "
            "deep; versions are whole numbers from 1 to 2^63-1; aliases are ASCII letters, digits, `-` and `_`. "
            "Invalid requests get 400 (never 422) naming the field, the value and the fix; 404 for what does not "
            "exist; 409 when the policy refuses or another change came first."
        ),
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
    )
    app.state.registry = registry
    app.state.keys = keys
    app.state.files = files
    app.state.fine_tuning = ft
    app.state.policies = policies
    install_error_handlers(app)
    app.add_exception_handler(PolicyRefused, _on_policy_refused)
    app.add_middleware(UploadLimitMiddleware, path="/v1/files", max_bytes=files.max_bytes)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers (no key needed)."""
        return {"status": "ok"}

    for module in (models, approvals, promotions, rollback, history, files_api, fine_tuning_api):
        app.include_router(module.router)
    app.include_router(console.router)
    app.add_exception_handler(console.LoginRequired, console.on_login_required)
    document_errors(app, {"*": (401, 403, 404), "POST": (409, 413), "DELETE": (409,)})
    app.add_middleware(StrictJSONMiddleware, max_bytes=MAX_JSON_BODY_BYTES)
    check_declared(app)
    return app
