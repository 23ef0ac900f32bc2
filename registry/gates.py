"""Promotion gates: pure functions from a policy, versions, decisions and scores to a verdict.

``check_policy`` reads nothing and moves nothing, so the verdict can be shown before any
alias moves (the console, ``forgeline promote --dry-run``) and re-checked under the
writer lock (`registry.promotion.promote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registry import lineage
from registry.approvals import Approval, standing
from registry.authz import person
from registry.client import VersionInfo
from registry.eval_samples import EvalSamples
from registry.metric_direction import lower_is_better as metric_lower_is_better
from registry.policy import PromotionPolicy, Significance, Threshold
from registry.significance import Interval, difference


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
