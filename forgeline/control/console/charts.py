"""Inline SVG charts for the console: no JavaScript, readable without colour (values are labelled)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

_COLOURS = ("#2563eb", "#9ca3af", "#16a34a", "#d97706", "#9333ea")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def bar_chart(title: str, bars: Sequence[tuple[str, float | None]], *, width: int = 360) -> Markup:
    """Horizontal bars, one per (label, value); a missing value is shown as "—"."""
    row, label_w, pad = 26, 120, 8
    height = row * len(bars) + 28
    values = [abs(v) for _, v in bars if v is not None and math.isfinite(v)]
    top = max(values, default=1.0) or 1.0
    span = width - label_w - 60
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="0" y="14" class="chart-title">{escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(bars):
        y = 24 + i * row
        parts.append(f'<text x="0" y="{y + 15}">{escape(label)}</text>')
        if value is None or not math.isfinite(value):
            parts.append(f'<text x="{label_w}" y="{y + 15}">—</text>')
            continue
        w = max(1.0, span * abs(value) / top)
        colour = _COLOURS[i % len(_COLOURS)]
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - pad}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 15}">{_fmt(value)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(
    title: str, curves: Mapping[str, Sequence[tuple[float, float]]], *, width: int = 560, height: int = 220
) -> Markup:
    """Lines of (step, value) points on shared axes, with a legend; empty curves are skipped."""
    curves = {name: points for name, points in curves.items() if points}
    left, right, top_pad, bottom = 48, 12, 44, 28
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="0" y="14" class="chart-title">{escape(title)}</text>',
    ]
    points = [p for series in curves.values() for p in series if math.isfinite(p[1])]
    if not points:
        parts.append(f'<text x="{left}" y="{height // 2}">no data yet</text></svg>')
        return Markup("".join(parts))
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    plot_w, plot_h = width - left - right, height - top_pad - bottom

    def xy(x: float, y: float) -> str:
        return f"{left + plot_w * (x - x0) / (x1 - x0):.1f},{top_pad + plot_h * (1 - (y - y0) / (y1 - y0)):.1f}"

    parts.append(
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#6b7280"/>'
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#6b7280"/>'
        f'<text x="0" y="{top_pad + 10}">{_fmt(y1)}</text><text x="0" y="{top_pad + plot_h}">{_fmt(y0)}</text>'
        f'<text x="{left}" y="{height - 6}">step {_fmt(x0)}</text>'
        f'<text x="{left + plot_w - 60}" y="{height - 6}">step {_fmt(x1)}</text>'
    )
    for i, (name, series) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = " ".join(xy(x, y) for x, y in series if math.isfinite(y))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        parts.append(
            f'<text x="{left + 8 + 130 * i}" y="{top_pad - 14}" fill="{colour}">■ {escape(name)} ({_fmt(series[-1][1])})</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
