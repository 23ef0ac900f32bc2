"""Which way is better for a metric, by its name: gates and reports read it here."""

from __future__ import annotations

LOWER_IS_BETTER_SUFFIXES: tuple[str, ...] = ("loss", "over_refusal_rate")
"""Metric-name endings where smaller is better: losses, and refusing harmless prompts."""


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (e.g. ``eval_loss``, ``safety_over_refusal_rate``)."""
    return metric.endswith(LOWER_IS_BETTER_SUFFIXES)
