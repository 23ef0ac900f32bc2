"""Check the gates of, and promote, a version under the model's server-side policy."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from forgeline.control.auth import caller
from forgeline.control.protocol import AuditEntryOut, PolicyResultOut, PromoteRequest, PromotionOut
from forgeline.control.routers.models import registry_of
from registry.keys import KeyRecord
from registry.policy import PolicyBook, PromotionPolicy
from registry.promotion import check, promote
from registry.refs import AliasName, VersionNumber

router = APIRouter(prefix="/v1/models/{name}", tags=["promotions"])


def policy_for(request: Request, name: str) -> PromotionPolicy:
    """The policy the server enforces for model ``name`` (callers cannot send their own)."""
    book: PolicyBook = request.app.state.policies
    return book.for_model(name)


@router.get("/policy")
def get_policy(name: str, request: Request, key: KeyRecord = Depends(caller)) -> dict[str, object]:
    """The promotion policy that governs the model."""
    return policy_for(request, name).model_dump(mode="json")


@router.get("/versions/{version}/gates")
def check_gates(
    name: str,
    version: VersionNumber,
    request: Request,
    alias: Annotated[AliasName | None, Query(description="Alias to check; default: the policy's `to`.")] = None,
    key: KeyRecord = Depends(caller),
) -> PolicyResultOut:
    """Dry run: every gate's verdict for moving ``alias`` to the version; moves nothing."""
    policy = policy_for(request, name)
    return PolicyResultOut.of(
        check(registry_of(request), name, version, policy, alias=alias)
    )


@router.post("/versions/{version}/promote")
def promote_version(
    name: str,
    version: VersionNumber,
    body: PromoteRequest,
    request: Request,
    key: KeyRecord = Depends(caller),
) -> PromotionOut:
    """Move the alias if every gate passes (409 ``policy_refused`` with every gate otherwise,
    409 ``conflict`` if another promotion moved it meanwhile)."""
    result, entry = promote(
        registry_of(request),
        name,
        version,
        policy=policy_for(request, name),
        alias=body.alias,
        actor=key.name,
        reason=body.reason,
    )
    return PromotionOut(policy_result=PolicyResultOut.of(result), audit=AuditEntryOut.of(entry))
