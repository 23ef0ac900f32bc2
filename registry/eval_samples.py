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
    scores: Mapping[str, Sequence[float]],
    base_scores: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Log the per-item scores of a version (and of its base on the same items).

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
            table[prefix + metric] = [float(v) for v in values]
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
