"""Confidence intervals for promotion gates: is a difference real or sampling noise?

An evaluation set is a sample. Two versions scored on 150 items can differ by two points of
accuracy by chance alone, so a gate that compares point estimates refuses good versions about
half the time when nothing changed, and lets real regressions through when the tolerance is
set wide to stop that. Gates with a ``significance`` policy compare the per-item scores
instead: the mean difference with a bootstrap confidence interval.

* **Paired** when both versions were scored on the same items (matched by item id, as the
  evaluation records them): resample items, take the mean of the per-item differences. Pairing
  cancels the items' own difficulty, so it detects smaller changes than an unpaired test.
* **Unpaired** otherwise: resample each side on its own.

Decisions are one-sided at the policy's level ``alpha``: a drop is significant when the
upper ``1 - alpha`` bound of the difference is below ``-tolerance``; a gain is significant
when the lower bound is above zero. Under no real change each errs with probability about
``alpha`` (tests/unit/registry/test_significance.py measures the false-refusal rate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The mean difference ``candidate - other`` and its one-sided bounds at ``1 - alpha``."""

    estimate: float
    low: float
    high: float
    alpha: float
    n: int
    paired: bool

    def describe(self) -> str:
        """E.g. ``-0.021 [-0.062, +0.018] at 95%, paired over 150 items``."""
        how = "paired" if self.paired else "unpaired"
        return (
            f"{self.estimate:+.4g} [{self.low:+.4g}, {self.high:+.4g}] at {100 * (1 - self.alpha):.0f}% one-sided bounds, "
            f"{how} over {self.n} items"
        )


def _bounds(means: np.ndarray, alpha: float) -> tuple[float, float]:
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def difference(
    candidate: Mapping[str, float] | Sequence[float],
    other: Mapping[str, float] | Sequence[float],
    *,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval | None:
    """Bootstrap interval of ``mean(candidate) - mean(other)``.

    Args:
        candidate: per-item scores of the candidate, keyed by item id (or a plain sequence).
        other: the same for the version it is compared with. When both are keyed and share
            at least half of the candidate's items, the shared items are compared paired.
        alpha: one-sided error level of each bound (0.05: the 5% and 95% quantiles).
        resamples: bootstrap resamples.
        seed: the resampling seed (fixed, so a gate's verdict is reproducible).

    Returns:
        The interval, or None when either side has no scores.
    """
    rng = np.random.default_rng(seed)
    if isinstance(candidate, Mapping) and isinstance(other, Mapping):
        shared = [item for item in candidate if item in other]
        if shared and len(shared) * 2 >= len(candidate):
            diffs = np.array([candidate[i] - other[i] for i in shared], dtype=float)
            picks = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
            low, high = _bounds(diffs[picks].mean(axis=1), alpha)
            return Interval(float(diffs.mean()), low, high, alpha, len(diffs), paired=True)
    a = np.array(list(candidate.values() if isinstance(candidate, Mapping) else candidate), dtype=float)
    b = np.array(list(other.values() if isinstance(other, Mapping) else other), dtype=float)
    if not len(a) or not len(b):
        return None
    means = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
    means -= b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    low, high = _bounds(means, alpha)
    return Interval(float(a.mean() - b.mean()), low, high, alpha, min(len(a), len(b)), paired=False)
