"""Promotion and rollback: alias moves decided by the gates, through the audited protocol.

:func:`check` loads what the pure gates (`registry.gates`) need from the registry;
``promote`` and ``rollback`` move aliases only through ``Registry.move_alias``, which
audits every move and is all-or-nothing. Approvals are recorded by `registry.decisions`.
"""

from __future__ import annotations

import logging

from registry.aliases import NO_HOLDER
from registry.audit import AuditEntry
from registry.client import Registry, VersionInfo
from registry.errors import ConflictError, NotFoundError, PolicyRefused
from registry.eval_samples import EvalSamples, load_samples
from registry.gates import PolicyResult, check_policy
from registry.policy import PromotionPolicy

logger = logging.getLogger(__name__)


def check(registry: Registry, name: str, version: int, policy: PromotionPolicy, *, alias: str | None = None) -> PolicyResult:
    """Dry run of :func:`promote`: every gate's verdict, loaded from the registry; moves nothing."""
    alias = alias or policy.to
    candidate = registry.get_version(name, version)
    holder = registry.alias_holder(name, alias)
    return check_policy(
        policy, candidate, holder=holder, alias=alias, decisions=registry.decisions(name, version),
        **_evidence(registry, policy, candidate, holder),
    )


def _evidence(
    registry: Registry, policy: PromotionPolicy, candidate: VersionInfo, holder: VersionInfo | None
) -> dict[str, EvalSamples | None]:
    """The per-item scores a significance-aware policy compares (none are read otherwise)."""
    if policy.significance is None or not (policy.no_regression or policy.better_than_base):
        return {}
    return {"samples": load_samples(registry, candidate), "holder_samples": load_samples(registry, holder)}


def promote(
    registry: Registry,
    name: str,
    version: int,
    *,
    policy: PromotionPolicy,
    alias: str | None = None,
    actor: str,
    reason: str = "",
) -> tuple[PolicyResult, AuditEntry]:
    """Move ``alias`` (default ``policy.to``) to ``version`` if every gate passes.

    The gates are checked against the holder read before the move, and the move is a
    compare-and-set on that holder: if another promotion moved the alias meanwhile,
    this one fails with ``ConflictError`` instead of skipping the regression check.
    Decisions are read again under the writer lock, so a rejection recorded between the
    check and the move still blocks it.

    Returns:
        The gates' verdict and the audit row of the move (which stores the verdict).

    Raises:
        PolicyRefused: a gate failed; nothing moved and nothing was audited. The verdict
            is on ``error.policy_result``.
        ConflictError: the alias moved between the check and the move; retry.
        NotFoundError: the version does not exist.
    """
    alias = alias or policy.to
    candidate = registry.get_version(name, version)
    holder = registry.alias_holder(name, alias)
    evidence = _evidence(registry, policy, candidate, holder)  # read once: the holder is fixed by the CAS below
    owner = registry.governance_owner(name)  # only this owner's and registration's decisions count (registry.approvals)
    result = check_policy(
        policy, candidate, holder=holder, alias=alias, decisions=registry.decisions(name, version, owner=owner), **evidence
    )
    _raise_if_refused(result, candidate, alias)

    def recheck(_current: int | None) -> None:
        # Under the writer lock: the holder is unchanged (compare-and-set), tags rarely
        # change, but a decision may have been recorded since the first check.
        again = check_policy(
            policy, candidate, holder=holder, alias=alias, decisions=registry.decisions(name, version, owner=owner),
            **evidence,
        )
        _raise_if_refused(again, candidate, alias)

    entry = registry.move_alias(
        name,
        alias,
        version,
        actor=actor,
        reason=reason or result.reason(),
        policy_result=result.to_dict(),
        action="promote",
        expected_from=holder.version if holder else NO_HOLDER,
        guard=recheck,
    )
    return result, entry


def _raise_if_refused(result: PolicyResult, candidate: VersionInfo, alias: str) -> None:
    if result.passed:
        return
    logger.info("refused %s -> %s@%s: %s", candidate.ref, candidate.name, alias, result.reason())
    error = PolicyRefused(f"{candidate.ref} cannot become {candidate.name}@{alias}: {result.reason()}", param="version")
    error.policy_result = result.to_dict()
    raise error


def previous_holder(history: list[AuditEntry]) -> tuple[int | None, int | None]:
    """Replay an alias's audit history as a stack (promotions push, rollbacks pop).

    Returns:
        ``(current, previous)``: the holder the log ends with and the one before it, so
        that rolling back twice walks further back instead of bouncing between two
        versions.
    """
    stack: list[int] = []
    for entry in history:
        if entry.action == "delete" or entry.to_version is None:
            stack.clear()
        elif entry.action == "rollback" and entry.to_version in stack:
            del stack[stack.index(entry.to_version) + 1 :]
        elif not stack or stack[-1] != entry.to_version:
            stack.append(entry.to_version)
    current = stack[-1] if stack else None
    previous = stack[-2] if len(stack) > 1 else None
    return current, previous


def rollback(
    registry: Registry,
    name: str,
    *,
    alias: str = "production",
    to_version: int | None = None,
    actor: str,
    reason: str = "",
) -> AuditEntry:
    """Move ``alias`` back, bypassing the gates (rollback is the emergency exit).

    Args:
        registry: the registry.
        name: registered model name.
        alias: the alias to roll back.
        to_version: target version; default: the version that held the alias before the
            current one, per the audit log.
        actor: who rolls back.
        reason: why.

    Raises:
        NotFoundError: the alias is not set, or there is no earlier version to return to.
        ConflictError: the audit log does not match MLflow (the alias was moved outside
            forgeline) and no ``to_version`` was given, or the alias moved meanwhile.
    """
    holder = registry.alias_holder(name, alias)
    if holder is None:
        raise NotFoundError(f"{name!r} has no alias {alias!r}; nothing to roll back", param="alias")
    if to_version is None:
        current, previous = previous_holder(registry.alias_history(name, alias))
        if current != holder.version:
            raise ConflictError(
                f"{name}@{alias} is version {holder.version} in MLflow but {current} per the audit log "
                "(moved outside forgeline?); pass the target version explicitly",
                param="to_version",
            )
        if previous is None:
            raise NotFoundError(
                f"{name}@{alias} has no earlier version in the audit log; pass the target version explicitly",
                param="to_version",
            )
        to_version = previous
    return registry.move_alias(
        name,
        alias,
        to_version,
        actor=actor,
        reason=reason or f"rollback from version {holder.version}",
        action="rollback",
        expected_from=holder.version,
    )
