"""``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends

from registry.keys import KeyRecord
from serving.gateway.auth import check_model_allowed, get_principal, may_route, may_see
from serving.gateway.catalog import ModelCatalog, model_not_found
from serving.gateway.generation import get_catalog
from serving.gateway.protocol import ModelCard, ModelList

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/v1/models")
async def list_models(
    catalog: ModelCatalog = Depends(get_catalog), principal: KeyRecord | None = Depends(get_principal)
) -> ModelList:
    """Every name the caller's key may send as ``model`` (each alias is listed on its own)."""
    cards = [
        ModelCard(id=name, created=served.created)
        for served in catalog.list()
        for name in served.names
        if may_see(principal, served, name)
    ]
    return ModelList(data=cards)


@router.get("/v1/models/{model:path}")
async def retrieve_model(
    model: str, catalog: ModelCatalog = Depends(get_catalog), principal: KeyRecord | None = Depends(get_principal)
) -> ModelCard:
    """One model (OpenAI ``models.retrieve``); 404 ``model_not_found`` when unknown, 403 when not allowed."""
    check_model_allowed(principal, model)
    await catalog.prepare(model)
    route = catalog.route(model)
    if not may_route(principal, route):
        raise model_not_found(model)
    return ModelCard(id=model, created=route.served.created)
