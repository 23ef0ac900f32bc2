"""What ``forgeline serve`` serves, as data, and the gateway built from it.

`ServePlan` is everything the command resolved from its flags (registry refs, operator
bases, the ``serve`` options) or the path of a gateway config file. One process builds the
app from it directly; with ``--workers N`` the plan travels to each worker process in the
environment and `app_from_env` (a uvicorn app factory) builds that process's gateway.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from registry.errors import ErrorCode, ForgelineError
from serving.config import ServeSpec
from serving.gateway.quota import REDIS_URL_ENV

PLAN_ENV = "FORGELINE_SERVE_PLAN"
FACTORY = "forgeline.serve_app:app_from_env"
"""The import string uvicorn's worker processes build their app from."""


class ServePlan(BaseModel):
    """What to serve and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    refs: list[str] = Field(default_factory=list, description="Registry refs to serve.")
    bases: list[str] = Field(default_factory=list, description="Operator base models to serve bare.")
    spec: ServeSpec = Field(default_factory=ServeSpec)
    config: str | None = Field(default=None, description="A gateway config file; replaces refs, bases and spec.")


def check_processes(spec: ServeSpec, workers: int) -> None:
    """Refuse ``workers > 1`` with API keys but no shared quota store: each process would
    give a key its whole ``rpm``/``tpm`` again."""
    if workers > 1 and spec.auth and not (spec.redis_url or os.environ.get(REDIS_URL_ENV)):
        raise ForgelineError(
            f"--workers {workers} with API keys needs quotas shared between the processes: set `redis_url` "
            f"(or {REDIS_URL_ENV}=redis://HOST:6379/0), or serve with --workers 1",
            code=ErrorCode.INVALID_REQUEST,
            param="workers",
        )


def build_app(plan: ServePlan) -> FastAPI:
    """The gateway for ``plan`` (models are loaded by the app's lifespan)."""
    if plan.config is not None:
        from .gateway_config import build_from_config, load_gateway_config

        return build_from_config(load_gateway_config(plan.config))
    from serving import telemetry
    from serving.registry_models import BaseSource
    from serving.service import build_gateway

    from .cli_shared import open_registry
    from .finetune.base_models import BaseModelStore

    telemetry.configure_tracing()  # on only when the standard OTEL_* environment names an endpoint
    records = [BaseModelStore().get(name) for name in plan.bases] if plan.bases else []
    bases = [BaseSource(name=r.name, source=r.source, chat_template=r.chat_template) for r in records]
    return build_gateway(open_registry(), plan.refs, plan.spec, bases=bases)


def app_from_env() -> FastAPI:
    """uvicorn app factory for worker processes: the plan `forgeline serve` put in ``FORGELINE_SERVE_PLAN``."""
    from serving.service import configure_access_log

    raw = os.environ.get(PLAN_ENV)
    if not raw:
        raise RuntimeError(f"{PLAN_ENV} is not set; start worker processes with `forgeline serve --workers N`")
    configure_access_log()
    return build_app(ServePlan.model_validate_json(raw))
