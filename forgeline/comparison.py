"""The comparison report of a version: every evaluation metric against its base and the production holder.

A Markdown table (with paired bootstrap intervals of the differences where per-item scores
exist on both sides), the same rows as JSON, and a PNG plot (one small panel per metric),
logged on the version's training run under ``forgeline/report/`` and named by the
``forgeline.eval_report`` tag. The console's version page shows the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ForgelineError
from registry.eval_samples import EvalSamples, load_samples
from registry.significance import Interval, difference

log = logging.getLogger(__name__)

REPORT_FOLDER = "forgeline/report"
ALIAS = "production"


@dataclass(frozen=True)
class ReportRow:
    metric: str
    version: float | None
    base: float | None
    production: float | None
    vs_base: str | None
    vs_production: str | None


def _interval(mine: dict[str, dict[str, float]] | None, theirs: dict[str, dict[str, float]] | None, metric: str) -> Interval | None:
    if not mine or not theirs or metric not in mine or metric not in theirs:
        return None
    return difference(mine[metric], theirs[metric], alpha=0.05, resamples=1000, seed=0)


def _shown(interval: Interval | None) -> str | None:
    return None if interval is None else f"{interval.estimate:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def report_rows(info: VersionInfo, holder: VersionInfo | None, samples: EvalSamples | None,
                holder_samples: EvalSamples | None) -> list[ReportRow]:
    """One row per metric of the version, its base or the production holder."""
    mine, base = info.metrics(), info.base_metrics()
    prod = holder.metrics() if holder is not None else {}
    rows = []
    for metric in sorted(set(mine) | set(base) | set(prod)):
        vs_base = _interval(samples.version if samples else None, samples.base if samples else None, metric)
        vs_prod = _interval(samples.version if samples else None, holder_samples.version if holder_samples else None, metric)
        rows.append(ReportRow(metric, mine.get(metric), base.get(metric), prod.get(metric), _shown(vs_base), _shown(vs_prod)))
    return rows


def markdown(info: VersionInfo, holder: VersionInfo | None, rows: list[ReportRow]) -> str:
    """The report as a Markdown table."""
    def num(value: float | None) -> str:
        return "—" if value is None else f"{value:.4g}"

    prod = f"production (v{holder.version})" if holder else "production (none)"
    lines = [
        f"# {info.ref}: evaluation against its base and {prod}",
        "",
        "Differences are the version minus the other, with one-sided 95% paired bootstrap bounds over per-item scores.",
        "",
        f"| metric | v{info.version} | base | {prod} | vs base | vs production |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.metric} | {num(r.version)} | {num(r.base)} | {num(r.production)} | {r.vs_base or '—'} | {r.vs_production or '—'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(info: VersionInfo, holder: VersionInfo | None, rows: list[ReportRow], out: Path) -> Path:
    """One panel per metric: bars for the version, its base and the production holder (values labelled)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a job node
    import matplotlib.pyplot as plt

    columns = 3
    lines = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 1.9 * lines), squeeze=False)
    labels = [f"v{info.version}", "base", f"prod v{holder.version}" if holder else "prod"]
    colours = ["#2563eb", "#9ca3af", "#16a34a"]
    for ax, row in zip(axes.flat, rows, strict=False):
        values = [row.version, row.base, row.production]
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax.barh(labels, shown, color=colours)
        for y, value in enumerate(values):
            ax.text(shown[y], y, " —" if value is None else f" {value:.3g}", va="center", fontsize=8)
        ax.set_title(row.metric, fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max([abs(v) for v in shown] + [1e-9]) * 1.35)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{info.ref} vs base and production", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def attach_report(registry: Registry, info: VersionInfo, *, alias: str = ALIAS) -> list[ReportRow]:
    """Build the report and log it on the version's run (``forgeline/report/comparison.{md,json,png}``).

    The report is a view: failing to draw it is logged, never an evaluation failure.
    """
    run_id = info.run_id or info.tags.get(lineage.RUN_ID)
    try:
        holder = registry.alias_holder(info.name, alias)
    except ForgelineError:
        holder = None
    rows = report_rows(info, holder, load_samples(registry, info), load_samples(registry, holder) if holder else None)
    if not run_id or not rows:
        return rows
    with tempfile.TemporaryDirectory(prefix="forgeline-report-") as tmp:
        folder = Path(tmp)
        (folder / "comparison.md").write_text(markdown(info, holder, rows))
        (folder / "comparison.json").write_text(json.dumps(
            {"version": info.ref, "production": holder.ref if holder else None, "rows": [asdict(r) for r in rows]}, indent=2))
        try:
            plot(info, holder, rows, folder / "comparison.png")
        except (ImportError, ValueError, RuntimeError) as err:  # e.g. matplotlib absent: the table still goes
            log.warning("comparison plot of %s not drawn: %s", info.ref, err)
        registry.upload_artifacts(run_id, folder, REPORT_FOLDER)
    registry.set_tags(info.name, info.version, {lineage.EVAL_REPORT: REPORT_FOLDER})
    return rows
