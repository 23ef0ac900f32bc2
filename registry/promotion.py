"""Promotion gates, approvals, promotion and rollback.

``check_policy`` is pure (a policy, versions and decisions in, a verdict out) so it can
be shown before anything moves; :func:`check` loads what it needs from the registry.
``promote`` and ``rollback`` move aliases only through ``Registry.move_alias``, which
audits every move and is all-or-nothing. :func:`decide` records an approval or a
rejection (no self-approval).

Lifecycle of a version (:func:`lifecycle_state`): ``registered`` → ``evaluated`` →
``approved`` → ``built`` → pointed at by aliases (``candidate``, ``staging``,
``production``…), or ``rejected``. It is derived from the version's tags, its standing
decisions and its aliases rather than stored, so it cannot drift from them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from registry import lineage
from registry.approvals import Approval, Decision, standing
from registry.audit import AuditEntry
from registry.authz import person
from registry.client import NO_HOLDER, Registry, VersionInfo
from registry.errors import (
    ConflictError,
    ErrorCode,
    ForgelineError,
    NotFoundError,
    PermissionDeniedError,
    PolicyRefused,
)
from registry.eval_samples import EvalSamples, load_samples
from registry.metric_direction import lower_is_better as metric_lower_is_better
from registry.policy import APPROVER_ROLES, PromotionPolicy, Significance, Threshold
from registry.significance import Interval, difference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, e.g. ``GateResult("threshold:accuracy", True, "accuracy >= 0.8: 0.93")``."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class PolicyResult:
    """All gates' verdicts; ``passed`` only when every gate passed."""

    gates: tuple[GateResult, ...]
    passed: bool

    @property
    def failed(self) -> tuple[GateResult, ...]:
        """The gates that did not pass, in policy order."""
        return tuple(gate for gate in self.gates if not gate.passed)

    def reason(self) -> str:
        """One line: which gates failed and why, or that all passed."""
        if self.passed:
            return f"all {len(self.gates)} gate(s) passed" if self.gates else "no gates configured"
        failed = self.failed
        return f"refused by {len(failed)} of {len(self.gates)} gate(s): " + "; ".join(
            f"{gate.name} ({gate.detail})" for gate in failed
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, stored with the audit row of the move."""
        return {
            "passed": self.passed,
            "gates": [{"name": gate.name, "passed": gate.passed, "detail": gate.detail} for gate in self.gates],
        }


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (see `registry.metric_direction`)."""
    return metric_lower_is_better(metric)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _never_evaluated(metric: str, version: VersionInfo) -> str:
    return f"{metric} was never evaluated on {version.ref}; run the evaluation first"


def _threshold_gate(metric: str, bound: Threshold, metrics: dict[str, float], version: VersionInfo) -> GateResult:
    name = f"threshold:{metric}"
    value = metrics.get(metric)
    if bound.min is not None and bound.max is not None:
        rule = f"{_fmt(bound.min)} <= {metric} <= {_fmt(bound.max)}"
    elif bound.min is not None:
        rule = f"{metric} >= {_fmt(bound.min)}"
    else:
        rule = f"{metric} <= {_fmt(bound.max)}"  # type: ignore[arg-type]  # validator guarantees one bound
    if value is None:
        return GateResult(name, False, _never_evaluated(metric, version))
    passed = (bound.min is None or value >= bound.min) and (bound.max is None or value <= bound.max)
    return GateResult(name, passed, f"{rule}: {_fmt(value)}")


def _interval(
    metric: str, mine: dict[str, dict[str, float]] | None, theirs: dict[str, dict[str, float]] | None, how: Significance
) -> Interval | None:
    if not mine or not theirs or metric not in mine or metric not in theirs:
        return None
    return difference(mine[metric], theirs[metric], alpha=how.alpha, resamples=how.resamples, seed=how.seed)


def _base_gate(
    metric: str,
    metrics: dict[str, float],
    base: dict[str, float],
    version: VersionInfo,
    *,
    significance: Significance | None = None,
    samples: EvalSamples | None = None,
) -> GateResult:
    name = f"better_than_base:{metric}"
    value = metrics.get(metric)
    if value is None:
        return GateResult(name, False, _never_evaluated(metric, version))
    lower = lower_is_better(metric)
    if significance is not None:
        interval = _interval(metric, samples.version if samples else None, samples.base if samples else None, significance)
        if interval is not None:
            # A real gain: the whole interval on the better side of zero.
            passed = interval.high < 0 if lower else interval.low > 0
            verdict = "a significant gain" if passed else "not a significant gain"
            return GateResult(name, passed, f"{metric} vs base: {interval.describe()}: {verdict}")
    base_value = base.get(metric)
    if base_value is None:
        return GateResult(
            name, False, f"no base-model {metric} recorded for {version.ref}; evaluate the base model too"
        )
    passed = value < base_value if lower else value > base_value
    note = "; no per-item scores, point estimates compared" if significance is not None else ""
    return GateResult(name, passed, f"{metric} {'<' if lower else '>'} base: {_fmt(value)} vs base {_fmt(base_value)}{note}")


def _regression_gate(
    metric: str,
    metrics: dict[str, float],
    holder: VersionInfo | None,
    tolerance: float,
    version: VersionInfo,
    *,
    significance: Significance | None = None,
    samples: EvalSamples | None = None,
    holder_samples: EvalSamples | None = None,
) -> GateResult:
    name = f"no_regression:{metric}"
    if holder is None:
        return GateResult(name, True, "no version holds the alias yet")
    value = metrics.get(metric)
    if value is None:
        return GateResult(name, False, _never_evaluated(metric, version))
    held = holder.metrics().get(metric)
    if held is None:
        # Nothing to regress against: blocking here would pin the alias forever to a
        # version that predates this metric.
        return GateResult(name, True, f"{holder.ref} has no {metric}; nothing to compare")
    lower = lower_is_better(metric)
    if significance is not None:
        interval = _interval(
            metric, samples.version if samples else None, holder_samples.version if holder_samples else None, significance
        )
        if interval is not None:
            # Refuse only a drop beyond the tolerance that sampling noise cannot explain.
            passed = interval.low <= tolerance if lower else interval.high >= -tolerance
            verdict = "no significant regression" if passed else f"a significant regression beyond tolerance {_fmt(tolerance)}"
            return GateResult(name, passed, f"{metric} vs {holder.ref}: {interval.describe()}: {verdict}")
    if lower:
        passed = value <= held + tolerance
        rule = f"{metric} <= {holder.ref} + {_fmt(tolerance)}"
    else:
        passed = value >= held - tolerance
        rule = f"{metric} >= {holder.ref} - {_fmt(tolerance)}"
    note = "; no per-item scores, point estimates compared" if significance is not None else ""
    return GateResult(name, passed, f"{rule}: {_fmt(value)} vs {_fmt(held)}{note}")


def _approvals_gate(
    policy: PromotionPolicy, version: VersionInfo, alias: str, decisions: Sequence[Approval]
) -> GateResult | None:
    required = policy.required_approvals(alias)
    latest = standing(d for d in decisions if d.model == version.name and d.version == version.version)
    rejections = [d for d in latest.values() if d.decision == "reject"]
    if rejections:
        who = "; ".join(f"{d.approver} ({d.role}): {d.comment or 'no comment'}" for d in rejections)
        return GateResult("approvals", False, f"{version.ref} was rejected by {who}")
    if required == 0:
        return None
    trainer = version.tags.get(lineage.TRAINED_BY)
    roles = set(policy.approvals.roles) | {"admin"}
    counted = sorted(
        d.approver for d in latest.values() if d.decision == "approve" and person(d.approver) != trainer and d.role in roles
    )
    detail = f"{len(counted)} of {required} approval(s) from {'/'.join(sorted(roles))}"
    detail += f" ({', '.join(counted)})" if counted else ""
    if len(counted) < required:
        detail += f"; ask {'an' if required - len(counted) == 1 else required - len(counted)} approver(s) other than the trainer"
        detail += f": `forgeline approve {version.name} {version.version} --comment ...`"
    return GateResult("approvals", len(counted) >= required, detail)


def _engine_gate(engine: str, version: VersionInfo, alias: str) -> GateResult:
    name = f"requires:{alias}:engine"
    uri = version.tags.get(lineage.engine_tag(engine))
    if uri:
        return GateResult(name, True, f"{engine} engine built: {uri}")
    return GateResult(
        name,
        False,
        f"{alias} needs a {engine} engine and {version.ref} has none; "
        f"run `forgeline build {version.ref} --target {engine}`",
    )


def check_policy(
    policy: PromotionPolicy,
    version: VersionInfo,
    *,
    holder: VersionInfo | None,
    alias: str | None = None,
    decisions: Sequence[Approval] = (),
    samples: EvalSamples | None = None,
    holder_samples: EvalSamples | None = None,
) -> PolicyResult:
    """Evaluate every gate of ``policy`` for moving ``alias`` to ``version``.

    Args:
        policy: the gates.
        version: the candidate, with its ``forgeline.eval.*`` / ``forgeline.base_eval.*``
            and ``forgeline.engine.*`` tags.
        holder: the version holding the target alias now (``None`` when unset).
        alias: the alias to move; default ``policy.to`` (selects ``policy.requires``).
        decisions: the approve/reject decisions recorded on the version (an
            ``approvals`` gate appears when approvals are required or one is a rejection).
        samples: the candidate's per-item scores (and its base's), for a policy with
            ``significance``.
        holder_samples: the holder's per-item scores, likewise.

    Returns:
        Every gate's verdict (all are evaluated, so a refusal lists every problem at once).
    """
    alias = alias or policy.to
    metrics = version.metrics()
    base = version.base_metrics()
    gates: list[GateResult] = []
    gates += [_threshold_gate(metric, bound, metrics, version) for metric, bound in policy.thresholds.items()]
    how = policy.significance
    gates += [
        _base_gate(metric, metrics, base, version, significance=how, samples=samples) for metric in policy.better_than_base
    ]
    gates += [
        _regression_gate(
            metric, metrics, holder, policy.tolerance, version,
            significance=how, samples=samples, holder_samples=holder_samples,
        )
        for metric in policy.no_regression
    ]
    requirement = policy.requires.get(alias)
    if requirement is not None and requirement.engine:
        gates.append(_engine_gate(requirement.engine, version, alias))
    approvals = _approvals_gate(policy, version, alias, decisions)
    if approvals is not None:
        gates.append(approvals)
    return PolicyResult(gates=tuple(gates), passed=all(gate.passed for gate in gates))


def check(registry: Registry, name: str, version: int, policy: PromotionPolicy, *, alias: str | None = None) -> PolicyResult:
    """Dry run of :func:`promote`: every gate's verdict, loaded from the registry; moves nothing."""
    alias = alias or policy.to
    candidate = registry.get_version(name, version)
    holder = registry.alias_holder(name, alias)
    return check_policy(
        policy, candidate, holder=holder, alias=alias, decisions=registry.approvals.for_version(name, version),
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
    result = check_policy(
        policy, candidate, holder=holder, alias=alias, decisions=registry.approvals.for_version(name, version), **evidence
    )
    _raise_if_refused(result, candidate, alias)

    def recheck(_current: int | None) -> None:
        # Under the writer lock: the holder is unchanged (compare-and-set), tags rarely
        # change, but a decision may have been recorded since the first check.
        again = check_policy(
            policy, candidate, holder=holder, alias=alias, decisions=registry.approvals.for_version(name, version),
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
        model=name, version=version, approver=actor, role=role, decision=decision, comment=comment.strip()
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
        current, previous = previous_holder(registry.audit.history(name, alias))
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
