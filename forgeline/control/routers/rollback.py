"""Roll an alias back (the emergency exit: no gates, ``approver`` or ``admin`` only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from forgeline.control.auth import caller
from forgeline.control.protocol import AuditEntryOut, RollbackRequest
from forgeline.control.routers.models import registry_of
from registry.keys import KeyRecord
from registry.promotion import rollback
from registry.refs import AliasName

router = APIRouter(prefix="/v1/models/{name}/aliases/{alias}", tags=["rollback"])


@router.post("/rollback")
def rollback_alias(
    name: str,
    alias: AliasName,
    body: RollbackRequest,
    request: Request,
    key: KeyRecord = Depends(caller),
) -> AuditEntryOut:
    """Point the alias back at the previous holder (or ``to_version``); audited."""
    entry = rollback(
        registry_of(request),
        name,
        alias=alias,
        to_version=body.to_version,
        actor=key.name,
        reason=body.reason,
    )
    return AuditEntryOut.of(entry)
