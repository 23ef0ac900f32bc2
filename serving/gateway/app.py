"""The OpenAI-compatible gateway application.

``create_app(catalog)`` wires the routers, the OpenAI-shaped error handlers and a lifespan
that starts every engine before the first request and stops them on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.engine.base import Engine
from serving.gateway import chat, completions, health, models
from serving.gateway.catalog import ModelCatalog, ServedModel, StaticCatalog
from serving.gateway.errors import install_error_handlers
from serving.gateway.generation import GatewaySettings

logger = logging.getLogger(__name__)

__all__ = ["GatewaySettings", "ModelCatalog", "ServedModel", "StaticCatalog", "create_app"]


def _engines(catalog: ModelCatalog) -> list[Engine]:
    # Several names may share one engine; start and stop each engine once.
    unique: dict[int, Engine] = {}
    for served in catalog.list():
        unique.setdefault(id(served.engine), served.engine)
    return list(unique.values())


async def _stop_all(engines: list[Engine]) -> None:
    results = await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
    for engine, result in zip(engines, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("stopping engine %s failed: %s", engine.model_id, result)


def create_app(catalog: ModelCatalog, *, max_new_tokens: int = 256) -> FastAPI:
    """Build the gateway for the models in ``catalog``.

    Args:
        catalog: resolves request ``model`` names to served models.
        max_new_tokens: default ``max_tokens`` for chat, and the most any request may ask for.

    Returns:
        A FastAPI app; its lifespan starts the engines (startup fails if one cannot start).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = _engines(catalog)
        results = await asyncio.gather(*(e.start() for e in engines), return_exceptions=True)
        failed = [(e, r) for e, r in zip(engines, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            await _stop_all(engines)
            engine, error = failed[0]
            raise RuntimeError(f"engine {engine.model_id} failed to start: {error}") from error
        logger.info("gateway serving %s", ", ".join(n for m in catalog.list() for n in m.names) or "no models")
        try:
            yield
        finally:
            await _stop_all(engines)

    app = FastAPI(title="forgeline gateway", version="0.1.0", lifespan=lifespan)
    app.state.catalog = catalog
    app.state.settings = GatewaySettings(max_new_tokens=max_new_tokens)
    install_error_handlers(app)
    for module in (health, models, chat, completions):
        app.include_router(module.router)
    return app
