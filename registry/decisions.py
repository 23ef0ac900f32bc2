"""Approval decisions and the lifecycle state they feed.

:func:`decide` records an approval or a rejection (approver role required, no
self-approval). Lifecycle of a version (:func:`lifecycle_state`): ``registered`` →
``evaluated`` → ``approved`` → ``built`` → pointed at by aliases (``candidate``,
``staging``, ``production``…), or ``rejected``. It is derived from the version's tags,
its standing decisions and its aliases rather than stored, so it cannot drift from them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from registry import lineage
from registry.approvals import Approval, Decision, standing
from registry.authz import person
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError, PermissionDeniedError
from registry.policy import APPROVER_ROLES

logger = logging.getLogger(__name__)


def decide(
    registry: Registry,
    name: str,
    version: int,
    *,
    actor: str,
    roles: Iterable[str],
    decision: Decision,
    comment: str,
) -> Approval:
    """Record ``actor``'s approval or rejection of a version.

    Args:
        registry: the registry.
        name: registered model name.
        version: version number.
        actor: who decides (an OS user or an API key's name).
        roles: the roles ``actor`` holds; ``approver`` or ``admin`` is required.
        decision: ``approve`` or ``reject``. A person's latest decision is the one that
            counts; a standing rejection blocks every promotion of the version.
        comment: why (required: it is what reviewers read later).

    Raises:
        PermissionDeniedError: ``actor`` has neither role, or trained the version and
            tries to approve it (no self-approval; rejecting one's own version is allowed).
        NotFoundError: the version does not exist.
        ForgelineError: the comment is empty or the decision unknown (``invalid_request``).
    """
    if decision not in ("approve", "reject"):
        raise ForgelineError(
            f"decision must be `approve` or `reject`, got {decision!r}", code=ErrorCode.INVALID_REQUEST, param="decision"
        )
    if not comment or not comment.strip():
        raise ForgelineError(
            "a decision needs a comment saying why; fix: pass --comment \"...\"",
            code=ErrorCode.INVALID_REQUEST,
            param="comment",
        )
    if not actor or not actor.strip():
        raise ForgelineError("a decision needs an actor", code=ErrorCode.INVALID_REQUEST, param="actor")
    held = set(roles)
    role = next((r for r in APPROVER_ROLES if r in held), None)
    if role is None:
        raise PermissionDeniedError(
            f"{actor!r} may not {decision} versions: that needs the approver or admin role "
            f"(has: {', '.join(sorted(held)) or 'none'})",
            param="role",
        )
    info = registry.get_version(name, version)
    trainer = info.tags.get(lineage.TRAINED_BY)
    # A local admin (`local-admin:ana`) is still ana: she may not approve what she trained.
    if decision == "approve" and trainer is not None and trainer == person(actor):
        raise PermissionDeniedError(
            f"{actor!r} trained {info.ref} and cannot approve it (no self-approval); ask another approver",
            param="approver",
        )
    recorded = registry.approvals.append(
        model=name, version=version, approver=actor, role=role, decision=decision, comment=comment.strip(),
        owner=registry.governance_owner(name),  # it counts for the model's owner and registration now, only for them
    )
    logger.info("%s %sd %s: %s", actor, decision, info.ref, comment)
    registry.events.publish(
        "approved" if decision == "approve" else "rejected",
        model=name,
        version=version,
        actor=actor,
        data={"role": role, "comment": recorded.comment, "approval_id": recorded.id},
    )
    return recorded


def lifecycle_state(version: VersionInfo, decisions: Sequence[Approval] = ()) -> str:
    """Where a version is in its lifecycle (see the module docstring).

    Returns:
        ``rejected`` (a standing rejection), else the comma-joined aliases pointing at it,
        else ``built``, ``approved``, ``evaluated`` or ``registered``.
    """
    latest = standing(decisions)
    if any(d.decision == "reject" for d in latest.values()):
        return "rejected"
    if version.aliases:
        return ",".join(version.aliases)
    if any(key.startswith(lineage.ENGINE_PREFIX) for key in version.tags):
        return "built"
    if any(d.decision == "approve" for d in latest.values()):
        return "approved"
    if version.metrics():
        return "evaluated"
    return "registered"
