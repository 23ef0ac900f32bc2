"""Significance-aware gates: sampling noise passes ``no_regression``, real regressions and
non-gains are refused with their interval, and the false-refusal rate stays at the policy's level."""

from __future__ import annotations

import numpy as np
import pytest

from registry import lineage
from registry.client import VersionInfo
from registry.eval_samples import EvalSamples
from registry.gates import check_policy
from registry.policy import PromotionPolicy
from registry.significance import difference

ALPHA = 0.05
POLICY = PromotionPolicy.model_validate(
    {"no_regression": ["accuracy"], "significance": {"alpha": ALPHA, "resamples": 1000}}
)
POINT_POLICY = PromotionPolicy.model_validate({"no_regression": ["accuracy"]})


def version(number: int, scores: dict[str, list[float]], base: dict[str, list[float]] | None = None) -> tuple[VersionInfo, EvalSamples]:
    tags = {lineage.EVAL_PREFIX + m: repr(float(np.mean(v))) for m, v in scores.items()}
    tags |= {lineage.BASE_EVAL_PREFIX + m: repr(float(np.mean(v))) for m, v in (base or {}).items()}
    info = VersionInfo(name="m", version=number, run_id=f"run{number}", source="s", tags=tags, aliases=(), created_ms=0)
    keyed = {m: {f"item-{i}": float(x) for i, x in enumerate(v)} for m, v in scores.items()}
    keyed_base = {m: {f"item-{i}": float(x) for i, x in enumerate(v)} for m, v in (base or {}).items()}
    return info, EvalSamples(version=keyed, base=keyed_base)


def gate(policy: PromotionPolicy, candidate: list[float], held: list[float]):
    info, samples = version(2, {"accuracy": candidate})
    holder, holder_samples = version(1, {"accuracy": held})
    result = check_policy(policy, info, holder=holder, samples=samples, holder_samples=holder_samples)
    return result.gates[0]


def test_noise_alone_is_refused_at_most_at_the_policy_level() -> None:
    # Repeated resampled evaluation sets: both versions answer each item right with the same
    # probability, so every refusal is a false one.
    rng = np.random.default_rng(7)
    trials, n, p = 300, 150, 0.85
    refused = point_refused = 0
    for _ in range(trials):
        candidate = (rng.random(n) < p).astype(float).tolist()
        held = (rng.random(n) < p).astype(float).tolist()
        refused += not gate(POLICY, candidate, held).passed
        point_refused += not gate(POINT_POLICY, candidate, held).passed
    rate, point_rate = refused / trials, point_refused / trials
    # Monte-Carlo error of the rate over 300 trials is about 0.013: allow two of them.
    assert rate <= ALPHA + 0.03, rate
    # The point comparison refuses about half of these identical versions: why this exists.
    assert point_rate > 0.3, point_rate


def test_a_real_regression_is_refused_with_its_interval() -> None:
    rng = np.random.default_rng(1)
    held = (rng.random(300) < 0.9).astype(float).tolist()
    candidate = (rng.random(300) < 0.75).astype(float).tolist()
    result = gate(POLICY, candidate, held)
    assert not result.passed
    assert "significant regression" in result.detail and "[" in result.detail and "paired over 300 items" in result.detail


def test_tolerance_widens_what_counts_as_a_regression() -> None:
    held = [1.0] * 80 + [0.0] * 20
    candidate = [1.0] * 78 + [0.0] * 22  # two items worse
    assert gate(POLICY, candidate, held).passed
    tolerant = POLICY.model_copy(update={"tolerance": 0.05})
    worse = [1.0] * 60 + [0.0] * 40
    assert not gate(tolerant, worse, held).passed


def test_lower_is_better_metrics_regress_upwards() -> None:
    policy = PromotionPolicy.model_validate({"no_regression": ["eval_loss"], "significance": {"resamples": 1000}})
    rng = np.random.default_rng(3)
    held = rng.normal(1.0, 0.2, 200).tolist()
    info, samples = version(2, {"eval_loss": [x + 0.3 for x in held]})
    holder, holder_samples = version(1, {"eval_loss": held})
    worse = check_policy(policy, info, holder=holder, samples=samples, holder_samples=holder_samples).gates[0]
    assert not worse.passed
    info, samples = version(2, {"eval_loss": [x - 0.3 for x in held]})
    better = check_policy(policy, info, holder=holder, samples=samples, holder_samples=holder_samples).gates[0]
    assert better.passed


def test_better_than_base_needs_a_significant_gain() -> None:
    policy = PromotionPolicy.model_validate({"better_than_base": ["accuracy"], "significance": {"resamples": 1000}})
    rng = np.random.default_rng(5)
    base = (rng.random(100) < 0.5).astype(float).tolist()
    info, samples = version_pair(base, (rng.random(100) < 0.9).astype(float).tolist())
    clearly = check_policy(policy, info, holder=None, samples=samples)
    assert clearly.passed and "a significant gain" in clearly.gates[0].detail
    one_more = list(base)
    one_more[one_more.index(0.0)] = 1.0  # one more item right: higher, but not significantly
    info, samples = version_pair(base, one_more)
    marginal = check_policy(policy, info, holder=None, samples=samples)
    assert not marginal.passed and "not a significant gain" in marginal.gates[0].detail


def version_pair(base: list[float], mine: list[float]) -> tuple[VersionInfo, EvalSamples]:
    return version(2, {"accuracy": mine}, base={"accuracy": base})


def test_without_per_item_scores_the_gate_says_it_compared_points() -> None:
    info, _ = version(2, {"accuracy": [1.0, 0.0]})
    holder, _ = version(1, {"accuracy": [1.0, 1.0]})
    result = check_policy(POLICY, info, holder=holder).gates[0]
    assert not result.passed and "point estimates compared" in result.detail


def test_unpaired_when_the_items_differ() -> None:
    a = {f"a{i}": 1.0 for i in range(50)}
    b = {f"b{i}": 1.0 for i in range(50)}
    interval = difference(a, b, resamples=500)
    assert interval is not None and not interval.paired and interval.estimate == 0.0
    assert difference({}, b) is None


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.2])
def test_alpha_is_checked(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        PromotionPolicy.model_validate({"significance": {"alpha": alpha}})
