"""Per-item evaluation scores of a version, kept as an MLflow table on its training run.

Aggregates (``forgeline.eval.*`` tags) say how good a version is; the per-item scores say how
sure we can be, which is what significance-aware gates need (``registry.significance``). Items
are keyed by a stable id (a digest of the prompt and the expected answer), so two versions
scored on the same evaluation set are compared item by item.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError

SAMPLES_FILE = "forgeline/eval_samples.json"
"""Where the table lives in the run's artifacts (MLflow's ``log_table`` JSON)."""

_VERSION, _BASE = "version.", "base."


@dataclass(frozen=True)
class EvalSamples:
    """Per-item scores: ``version[metric][item]`` and the base's ``base[metric][item]``."""

    version: dict[str, dict[str, float]] = field(default_factory=dict)
    base: dict[str, dict[str, float]] = field(default_factory=dict)


def record_samples(
    registry: Registry,
    info: VersionInfo,
    items: Sequence[str],
    scores: Mapping[str, Sequence[float | None]],
    base_scores: Mapping[str, Sequence[float | None]] | None = None,
) -> None:
    """Log the per-item scores of a version (and of its base on the same items).

    A None score is an item the metric does not apply to (suites keep their items in one
    table; a safety suite's over-refusal rate has no score on prompts that must be refused).

    Raises:
        ForgelineError: the version has no run to attach them to, or a column's length
            differs from the items' (``invalid_request``).
    """
    run_id = info.run_id or info.tags.get(lineage.RUN_ID)
    if not run_id:
        raise ForgelineError(f"{info.ref} has no training run to keep its per-item scores on", code=ErrorCode.INVALID_REQUEST)
    table: dict[str, list[object]] = {"item": list(items)}
    for prefix, columns in ((_VERSION, scores), (_BASE, base_scores or {})):
        for metric, values in columns.items():
            if len(values) != len(items):
                raise ForgelineError(
                    f"{metric}: {len(values)} scores for {len(items)} items", code=ErrorCode.INVALID_REQUEST, param="samples"
                )
            table[prefix + metric] = [None if v is None else float(v) for v in values]
    registry.log_table(run_id, data=table, artifact_file=SAMPLES_FILE)
    registry.set_tags(info.name, info.version, {lineage.EVAL_SAMPLES: SAMPLES_FILE})


def load_samples(registry: Registry, info: VersionInfo | None) -> EvalSamples | None:
    """The per-item scores recorded for a version, or None when it has none (or they are unreadable)."""
    if info is None or lineage.EVAL_SAMPLES not in info.tags:
        return None
    run_id = info.run_id or info.tags.get(lineage.RUN_ID)
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="forgeline-samples-") as tmp:
        try:
            path = registry.download_run_artifact(run_id, info.tags[lineage.EVAL_SAMPLES], tmp)
            table = json.loads(Path(path).read_text())
        except (ForgelineError, OSError, ValueError):
            return None
    columns, rows = table.get("columns", []), table.get("data", [])
    if "item" not in columns:
        return None
    at = columns.index("item")
    samples = EvalSamples()
    for index, column in enumerate(columns):
        for prefix, target in ((_VERSION, samples.version), (_BASE, samples.base)):
            if column.startswith(prefix):
                target[column[len(prefix):]] = {str(row[at]): float(row[index]) for row in rows if row[index] is not None}
    return samples


SUITES_FOLDER = "forgeline/suites"
"""Where each suite's per-sample table lives in the run's artifacts (``<suite>.json``, ``<suite>.base.json``)."""


def record_suite_samples(registry: Registry, info: VersionInfo, suite: str, rows: Sequence[Mapping[str, object]],
                         *, base: bool = False) -> str | None:
    """Log one suite's per-sample rows (prompt, answer, verdict...) as an MLflow table; returns its artifact path.

    Nothing is logged (None) for a version without a run, or without rows.
    """
    run_id = info.run_id or info.tags.get(lineage.RUN_ID)
    if not run_id or not rows:
        return None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = {column: [_cell(row.get(column)) for row in rows] for column in columns}
    path = f"{SUITES_FOLDER}/{suite}{'.base' if base else ''}.json"
    registry.log_table(run_id, data=table, artifact_file=path)
    return path


def _cell(value: object) -> object:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
