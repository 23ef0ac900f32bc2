"""What a suite run produces: aggregates, per-item scores for the gates, per-sample rows for people."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SuiteResult:
    """One suite's outcome on one model.

    ``metrics`` are named ``{suite}_{metric}``; ``scores[metric][i]`` is item ``items[i]``'s
    score on that metric (None where the metric does not apply to the item, e.g. the
    over-refusal rate of a prompt that must be refused). ``samples`` are the rows of the
    per-sample table (prompt, answer, expected, verdict...).
    """

    suite: str
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)
    scores: dict[str, list[float | None]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


def rate(values: list[float | None]) -> float | None:
    """Mean of the values that apply; None when none do."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def combine(
    task: tuple[list[str], dict[str, list[float]]] | None, results: list[SuiteResult]
) -> tuple[list[str], dict[str, list[float | None]]]:
    """One table of per-item scores from the task's and every suite's: the union of the items,
    None where a metric has no score for an item. Items keep their ids, so the same table built
    for another model lines up item by item."""
    parts = ([task] if task else []) + [(r.items, r.scores) for r in results if r.items]
    items: list[str] = []
    for ids, _ in parts:
        items += ids
    at = {item: i for i, item in enumerate(items)}
    columns: dict[str, list[float | None]] = {}
    for ids, scores in parts:
        for metric, values in scores.items():
            column = columns.setdefault(metric, [None] * len(items))
            for item, value in zip(ids, values, strict=True):
                column[at[item]] = value
    return items, columns


def aligned(items: list[str], other_items: list[str], other: dict[str, list[float | None]]) -> dict[str, list[float | None]]:
    """``other``'s columns re-ordered onto ``items`` (None for items it lacks)."""
    where = {item: i for i, item in enumerate(other_items)}
    return {metric: [values[where[item]] if item in where else None for item in items] for metric, values in other.items()}
