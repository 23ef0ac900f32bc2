"""``GET /health`` (the process is up) and ``GET /ready`` (every engine can serve)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serving.gateway.catalog import ModelCatalog
from serving.gateway.generation import get_catalog

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: 200 whenever the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(catalog: ModelCatalog = Depends(get_catalog)) -> JSONResponse:
    """Readiness: 200 once models are loaded and every engine is ready, else 503."""
    models = {served.name: bool(served.engine.ready) for served in catalog.list()}
    is_ready = bool(models) and all(models.values())
    body = {"status": "ready" if is_ready else "not_ready", "models": models}
    return JSONResponse(body, status_code=200 if is_ready else 503)
