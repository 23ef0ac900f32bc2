"""The OpenAI-compatible gateway application.

``create_app(catalog)`` wires the routers, the OpenAI-shaped error handlers, metrics and
the access log, optional API-key auth and quotas, and a lifespan that loads every model
before the first request and unloads them on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.gateway import chat, completions, health, metrics, models
from serving.gateway.auth import KeyAuth, KeyVerifier, check_declared
from serving.gateway.catalog import ModelCatalog, ServedModel, StaticCatalog
from serving.gateway.errors import document_errors, install_error_handlers
from serving.gateway.fast_chat import ChatFastPath
from serving.gateway.gateway_app import GatewayApp
from serving.gateway.generation import GatewaySettings
from serving.gateway.json_body import MAX_JSON_DEPTH, StrictJSONMiddleware
from serving.gateway.metrics import AccessLogMiddleware, GatewayMetrics
from serving.gateway.quota import Limiter, LocalLimiter

logger = logging.getLogger(__name__)

__all__ = ["GatewaySettings", "ModelCatalog", "ServedModel", "StaticCatalog", "create_app"]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(
    catalog: ModelCatalog,
    *,
    max_new_tokens: int = 256,
    keys: KeyVerifier | None = None,
    key_cache_s: float = 2.0,
    limiter: Limiter | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_per_key: bool = False,
) -> FastAPI:
    """Build the gateway for the models in ``catalog``.

    Args:
        catalog: resolves request ``model`` names to served models and loads them.
        max_new_tokens: default ``max_tokens`` for chat, and the most any request may ask for.
        keys: API-key store; when given, every endpoint but ``/health``, ``/ready`` and
            ``/metrics`` needs ``Authorization: Bearer <key>``. None turns auth off.
        key_cache_s: seconds a verified key is trusted before it is checked again.
        limiter: enforces each key's ``rpm``/``tpm``; defaults to an in-process limiter
            when ``keys`` is given (quotas belong to keys, so none without auth).
        max_body_bytes: larger request bodies get 413.
        metrics_per_key: label request and token counters with the key's id (opt-in: one
            series per key multiplies the series count).

    Returns:
        A FastAPI app; its lifespan loads the models (startup fails if one cannot load).
    """
    gateway_metrics = GatewayMetrics(per_key=metrics_per_key)
    if limiter is None and keys is not None:
        limiter = LocalLimiter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog.bind_metrics(gateway_metrics)
        try:
            await catalog.start()
        except BaseException as exc:
            # `run_server` reports it as one line (uvicorn would print the whole traceback).
            app.state.startup_error = exc
            raise
        for served in catalog.list():
            gateway_metrics.attach_engine(served)
        logger.info("gateway serving %s", ", ".join(n for m in catalog.list() for n in m.names) or "no models")
        if isinstance(app, GatewayApp):
            # FastAPI's own start-up (its telemetry's providers) is done: decided once, here.
            app.skip_noop_layers()
        try:
            yield
        finally:
            await catalog.stop()
            if limiter is not None:
                await limiter.close()

    app = GatewayApp(
        title="forgeline gateway",
        version="0.1.0",
        lifespan=lifespan,
        description=(
            "OpenAI-compatible chat and text completions. Limits this server enforces: request bodies up to "
            f"{max_body_bytes} bytes (413 beyond); `max_tokens` up to {max_new_tokens}; JSON must be UTF-8 without "
            f"unpaired UTF-16 surrogates and nested at most {MAX_JSON_DEPTH} deep. Invalid requests get 400 (never "
            "422) with an OpenAI error body naming the field; 401 without a valid key, 403 outside the key's models, "
            "404 for unknown models, 429 over quota (with `Retry-After`), 503 while a model is not ready."
        ),
    )
    app.state.catalog = catalog
    app.state.settings = GatewaySettings(max_new_tokens=max_new_tokens)
    app.state.auth = KeyAuth(keys, cache_s=key_cache_s) if keys is not None else None
    app.state.limiter = limiter
    app.state.metrics = gateway_metrics
    app.state.max_body_bytes = max_body_bytes
    gateway_metrics.watch(catalog)
    install_error_handlers(app)
    # Routes are matched in order, one by one: the chat route, which nearly every request
    # takes, goes first (no two routes here overlap, so the order changes no answer).
    for module in (chat, completions, models, health, metrics):
        app.include_router(module.router)
    document_errors(app, {"*": (401, 403, 404, 429, 503), "POST": (413,)})
    # Refuses JSON that parses but cannot be processed (surrogates, deep nesting) with a 400.
    app.add_middleware(StrictJSONMiddleware)
    # Chat completions, nearly every request, skip FastAPI's per-request machinery (the same
    # validation, authorization and endpoint; anything else goes on to the router). Above
    # StrictJSONMiddleware, whose checks it makes itself (`read_checked_body`): one layer less.
    app.add_middleware(ChatFastPath)
    check_declared(app)  # a route without a declared authorization rule is a bug: refuse to start
    # Outermost of ours: it sees every request, limits bodies (413) and logs when the body ends.
    app.add_middleware(AccessLogMiddleware, metrics=gateway_metrics, max_body_bytes=max_body_bytes)
    return app
