"""Which version held each alias when (the append-only audit log)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from forgeline.control.auth import caller
from forgeline.control.protocol import AuditEntryOut, HistoryOut
from forgeline.control.routers.models import registry_of
from registry.keys import KeyRecord

router = APIRouter(prefix="/v1/models/{name}", tags=["history"])


@router.get("/history")
def alias_history(
    name: str,
    request: Request,
    alias: Annotated[str | None, Query(description="Only this alias.")] = None,
    key: KeyRecord = Depends(caller),
) -> HistoryOut:
    """Every alias move of the model, oldest first, and where each alias points now."""
    registry = registry_of(request)
    current = registry.aliases(name)  # 404 for an unknown model
    entries = [AuditEntryOut.of(e) for e in registry.alias_history(name, alias)]  # the owning org's rows
    return HistoryOut(model=name, entries=entries, aliases=current)
