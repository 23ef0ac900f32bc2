"""Approve or reject a version (``approver`` or ``admin``; never the version's trainer)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from forgeline.control.auth import caller
from forgeline.control.protocol import ApprovalList, ApprovalOut, DecisionRequest
from forgeline.control.routers.models import registry_of
from registry.decisions import decide
from registry.keys import KeyRecord
from registry.refs import VersionNumber

router = APIRouter(prefix="/v1/models/{name}/versions/{version}/approvals", tags=["approvals"])


@router.post("", status_code=201)
def record_decision(
    name: str,
    version: VersionNumber,
    body: DecisionRequest,
    request: Request,
    key: KeyRecord = Depends(caller),
) -> ApprovalOut:
    """Record the key holder's decision; 403 for self-approval or a key without the role."""
    recorded = decide(
        registry_of(request),
        name,
        version,
        actor=key.name,
        roles=key.roles,
        decision=body.decision,
        comment=body.comment,
    )
    return ApprovalOut.of(recorded)


@router.get("")
def list_decisions(name: str, version: VersionNumber, request: Request, key: KeyRecord = Depends(caller)) -> ApprovalList:
    """Every decision on the version, oldest first."""
    registry = registry_of(request)
    registry.get_version(name, version)  # 404 for a version that does not exist
    return ApprovalList(approvals=[ApprovalOut.of(d) for d in registry.decisions(name, version)])
