"""check_policy: thresholds, better-than-base, no-regression, and the refusal message."""

from __future__ import annotations

import json

import pytest

from registry import lineage
from registry.audit import AuditEntry
from registry.client import VersionInfo
from registry.gates import check_policy
from registry.policy import PromotionPolicy, Threshold
from registry.promotion import previous_holder


def version(
    number: int = 2, metrics: dict[str, float] | None = None, base: dict[str, float] | None = None
) -> VersionInfo:
    tags = {lineage.EVAL_PREFIX + k: repr(v) for k, v in (metrics or {}).items()}
    tags |= {lineage.BASE_EVAL_PREFIX + k: repr(v) for k, v in (base or {}).items()}
    return VersionInfo(name="m", version=number, run_id=None, source="s", tags=tags, aliases=(), created_ms=0)


def test_metrics_are_parsed_from_tags_by_prefix() -> None:
    v = version(metrics={"accuracy": 0.9}, base={"accuracy": 0.7})
    assert v.metrics() == {"accuracy": 0.9}
    assert v.base_metrics() == {"accuracy": 0.7}


def test_empty_policy_passes() -> None:
    result = check_policy(PromotionPolicy(), version(), holder=None)
    assert result.passed and result.gates == ()
    assert result.reason() == "no gates configured"


def test_threshold_pass_and_detail() -> None:
    policy = PromotionPolicy(thresholds={"accuracy": Threshold(min=0.8)})
    result = check_policy(policy, version(metrics={"accuracy": 0.93}), holder=None)
    assert result.passed
    assert result.gates[0].detail == "accuracy >= 0.8: 0.93"


def test_threshold_fail_names_the_gate_in_reason() -> None:
    policy = PromotionPolicy(thresholds={"accuracy": Threshold(min=0.8), "latency_ms": Threshold(max=50)})
    result = check_policy(policy, version(metrics={"accuracy": 0.7, "latency_ms": 20}), holder=None)
    assert not result.passed
    assert [g.name for g in result.failed] == ["threshold:accuracy"]
    reason = result.reason()
    assert "threshold:accuracy" in reason and "0.7" in reason and "latency" not in reason
    assert "\n" not in reason


def test_threshold_with_both_bounds() -> None:
    policy = PromotionPolicy(thresholds={"length": Threshold(min=10, max=20)})
    assert check_policy(policy, version(metrics={"length": 15}), holder=None).passed
    failed = check_policy(policy, version(metrics={"length": 25}), holder=None)
    assert not failed.passed and failed.gates[0].detail == "10 <= length <= 20: 25"


def test_missing_metric_fails_saying_it_was_never_evaluated() -> None:
    policy = PromotionPolicy(thresholds={"accuracy": Threshold(min=0.8)})
    result = check_policy(policy, version(metrics={}), holder=None)
    assert not result.passed
    assert "never evaluated" in result.gates[0].detail and "m@2" in result.gates[0].detail


@pytest.mark.parametrize(
    ("metric", "value", "base", "passed"),
    [
        ("accuracy", 0.9, 0.8, True),
        ("accuracy", 0.8, 0.8, False),  # must beat, not tie
        ("accuracy", 0.7, 0.8, False),
        ("eval_loss", 1.2, 1.5, True),  # lower is better for *loss
        ("eval_loss", 1.8, 1.5, False),
    ],
)
def test_better_than_base(metric: str, value: float, base: float, passed: bool) -> None:
    policy = PromotionPolicy(better_than_base=[metric])
    result = check_policy(policy, version(metrics={metric: value}, base={metric: base}), holder=None)
    assert result.passed is passed


def test_better_than_base_without_base_metric_fails() -> None:
    policy = PromotionPolicy(better_than_base=["accuracy"])
    result = check_policy(policy, version(metrics={"accuracy": 0.9}), holder=None)
    assert not result.passed and "base-model" in result.gates[0].detail


def test_no_regression_passes_without_holder() -> None:
    policy = PromotionPolicy(no_regression=["accuracy"])
    assert check_policy(policy, version(metrics={"accuracy": 0.1}), holder=None).passed


@pytest.mark.parametrize(
    ("metric", "held", "value", "tolerance", "passed"),
    [
        ("accuracy", 0.90, 0.89, 0.02, True),  # within tolerance
        ("accuracy", 0.90, 0.87, 0.02, False),
        ("accuracy", 0.90, 0.95, 0.0, True),
        ("eval_loss", 1.0, 1.01, 0.02, True),  # loss may rise by the tolerance
        ("eval_loss", 1.0, 1.10, 0.02, False),
        ("eval_loss", 1.0, 0.90, 0.0, True),
    ],
)
def test_no_regression_against_holder(metric: str, held: float, value: float, tolerance: float, passed: bool) -> None:
    policy = PromotionPolicy(no_regression=[metric], tolerance=tolerance)
    holder = version(1, metrics={metric: held})
    result = check_policy(policy, version(2, metrics={metric: value}), holder=holder)
    assert result.passed is passed
    assert "m@1" in result.gates[0].detail


def test_every_gate_is_reported_and_to_dict_is_json() -> None:
    policy = PromotionPolicy(
        thresholds={"accuracy": Threshold(min=0.8)}, better_than_base=["eval_loss"], no_regression=["accuracy"]
    )
    result = check_policy(
        policy,
        version(metrics={"accuracy": 0.5, "eval_loss": 2.0}, base={"eval_loss": 1.0}),
        holder=version(1, metrics={"accuracy": 0.9}),
    )
    assert [g.name for g in result.failed] == [
        "threshold:accuracy",
        "better_than_base:eval_loss",
        "no_regression:accuracy",
    ]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["passed"] is False and len(data["gates"]) == 3


def _entry(action: str, to: int | None) -> AuditEntry:
    from datetime import UTC, datetime

    return AuditEntry(0, "m", "production", None, to, "a", "", action, None, datetime.now(UTC))


def test_previous_holder_walks_back_through_rollbacks() -> None:
    history = [_entry("promote", 1), _entry("promote", 2), _entry("promote", 3)]
    assert previous_holder(history) == (3, 2)
    history.append(_entry("rollback", 2))
    assert previous_holder(history) == (2, 1)  # a second rollback goes to 1, not back to 3
    history.append(_entry("delete", None))
    assert previous_holder(history) == (None, None)
