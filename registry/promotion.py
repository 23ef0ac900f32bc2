"""Promotion gates, promotion and rollback.

``check_policy`` is pure (a policy and versions in, a verdict out) so it can be shown
before anything moves; ``promote`` and ``rollback`` move aliases only through
``Registry.move_alias``, which audits every move and is all-or-nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from registry.audit import AuditEntry
from registry.client import NO_HOLDER, Registry, VersionInfo
from registry.errors import ConflictError, NotFoundError, PolicyRefused
from registry.policy import PromotionPolicy, Threshold

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
    """Whether smaller values of ``metric`` are better (names ending in ``loss``)."""
    return metric.endswith("loss")


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


def _base_gate(metric: str, metrics: dict[str, float], base: dict[str, float], version: VersionInfo) -> GateResult:
    name = f"better_than_base:{metric}"
    value = metrics.get(metric)
    if value is None:
        return GateResult(name, False, _never_evaluated(metric, version))
    base_value = base.get(metric)
    if base_value is None:
        return GateResult(
            name, False, f"no base-model {metric} recorded for {version.ref}; evaluate the base model too"
        )
    lower = lower_is_better(metric)
    passed = value < base_value if lower else value > base_value
    return GateResult(name, passed, f"{metric} {'<' if lower else '>'} base: {_fmt(value)} vs base {_fmt(base_value)}")


def _regression_gate(
    metric: str, metrics: dict[str, float], holder: VersionInfo | None, tolerance: float, version: VersionInfo
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
    if lower_is_better(metric):
        passed = value <= held + tolerance
        rule = f"{metric} <= {holder.ref} + {_fmt(tolerance)}"
    else:
        passed = value >= held - tolerance
        rule = f"{metric} >= {holder.ref} - {_fmt(tolerance)}"
    return GateResult(name, passed, f"{rule}: {_fmt(value)} vs {_fmt(held)}")


def check_policy(policy: PromotionPolicy, version: VersionInfo, *, holder: VersionInfo | None) -> PolicyResult:
    """Evaluate every gate of ``policy`` for ``version``.

    Args:
        policy: the gates.
        version: the candidate, with its ``forgeline.eval.*`` / ``forgeline.base_eval.*`` tags.
        holder: the version holding the target alias now (``None`` when unset).

    Returns:
        Every gate's verdict (all are evaluated, so a refusal lists every problem at once).
    """
    metrics = version.metrics()
    base = version.base_metrics()
    gates: list[GateResult] = []
    gates += [_threshold_gate(metric, bound, metrics, version) for metric, bound in policy.thresholds.items()]
    gates += [_base_gate(metric, metrics, base, version) for metric in policy.better_than_base]
    gates += [_regression_gate(metric, metrics, holder, policy.tolerance, version) for metric in policy.no_regression]
    return PolicyResult(gates=tuple(gates), passed=all(gate.passed for gate in gates))


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
    result = check_policy(policy, candidate, holder=holder)
    if not result.passed:
        logger.info("refused %s -> %s@%s: %s", candidate.ref, name, alias, result.reason())
        error = PolicyRefused(f"{candidate.ref} cannot become {name}@{alias}: {result.reason()}", param="version")
        error.policy_result = result.to_dict()
        raise error
    entry = registry.move_alias(
        name,
        alias,
        version,
        actor=actor,
        reason=reason or result.reason(),
        policy_result=result.to_dict(),
        action="promote",
        expected_from=holder.version if holder else NO_HOLDER,
    )
    return result, entry


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
