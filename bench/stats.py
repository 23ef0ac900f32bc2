"""Summaries of repeated measurements: percentiles of samples, median and spread of repeats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` of ``samples`` (None when there are none).

    Uses numpy's default (linear interpolation between order statistics).
    """
    if not samples:
        return {f"p{q:g}": None for q in qs}
    values = np.percentile(np.asarray(samples, dtype=float), list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min, max and count of repeated measurements of one figure (Nones dropped)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": float(np.median(kept)),
        "min": min(kept),
        "max": max(kept),
        "n": len(kept),
        "values": kept,
    }


def fmt_spread(s: dict[str, Any] | None, fmt: str = "{:.2f}", unit: str = "") -> str:
    """``median (min–max)`` for tables; ``n/a`` when nothing was measured."""
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f"{fmt.format(s['median'])}{unit}"
    return f"{fmt.format(s['median'])}{unit} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"
