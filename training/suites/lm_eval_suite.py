"""General capability through lm-evaluation-harness: multiple-choice log-likelihood on local files.

The harness scores the model already in memory (its ``HFLM`` wraps it, adapter on or off),
so the suite runs wherever ``forgeline evaluate`` runs, a cluster job included. Task YAMLs are
the harness's own format; their ``dataset_kwargs.data_files`` are local files (relative paths
start at the YAML's folder), loaded by the ``datasets`` JSON/CSV/Parquet builders, so nothing
is fetched from the hub at run time. The extra is ``pip install 'forgeline[eval]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from registry.errors import ConfigError, ErrorCode, FieldProblem, ForgelineError

from .result import SuiteResult
from .rows import unique_ids
from .spec import LmEvalSuite

log = logging.getLogger(__name__)


def task_config(path: str) -> dict[str, Any]:
    """A task YAML as the harness's dict config, its local data files made absolute.

    Raises:
        ConfigError: the YAML is not a mapping, or it does not read local files.
    """
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or "task" not in raw:
        raise ConfigError(problems=[FieldProblem("task", "not an lm-evaluation-harness task YAML", path,
                                                 "give a YAML with `task:`, `dataset_path:` and `output_type:`")], source=path)
    files = (raw.get("dataset_kwargs") or {}).get("data_files")
    if raw.get("dataset_path") not in ("json", "csv", "parquet") or not files:
        raise ConfigError(problems=[FieldProblem("dataset_path", "suites read local files only (no hub at run time)",
                                                 raw.get("dataset_path"),
                                                 "use `dataset_path: json` with `dataset_kwargs.data_files` (docs/EVALUATION.md)")],
                          source=path)
    folder = Path(path).resolve().parent

    def local(value: Any) -> Any:
        if isinstance(value, str):
            return value if Path(value).is_absolute() else str(folder / value)
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        return value

    return {**raw, "dataset_kwargs": {**raw["dataset_kwargs"], "data_files": local(files)}}


def run_lm_eval(suite: LmEvalSuite, model: Any, tokenizer: Any) -> SuiteResult:
    """``{name}_{metric}`` (e.g. ``general_accuracy`` for ``acc``), per task and over all items.

    Raises:
        ForgelineError: lm-evaluation-harness is not installed (with the pip command).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ForgelineError(f"the {suite.name} suite needs lm-evaluation-harness ({err}); fix: pip install 'forgeline[eval]'",
                             code=ErrorCode.MISSING_DEPENDENCY, param="suites") from None

    configs = [task_config(p) for p in suite.task_files]
    side = tokenizer.padding_side
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size, device=str(model.device))
    try:
        out = simple_evaluate(
            model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False), num_fewshot=suite.num_fewshot,
            limit=suite.max_samples, log_samples=True, bootstrap_iters=0, apply_chat_template=suite.apply_chat_template,
        )
    finally:
        tokenizer.padding_side = side
    if out is None:  # only on non-zero ranks of a distributed run, which forgeline evaluate is not
        return SuiteResult(suite.name, suite.kind)
    metric = "accuracy" if suite.metric == "acc" else suite.metric
    column = f"{suite.name}_{metric}"
    result = SuiteResult(suite.name, suite.kind, scores={column: []})
    for config in configs:
        task = config["task"]
        samples = out["samples"].get(task, [])
        values = [float(s[suite.metric]) for s in samples]
        if values:
            result.metrics[f"{suite.name}_{task}_{metric}"] = sum(values) / len(values)
        for sample, value in zip(samples, values, strict=True):
            result.items.append(f"{suite.name}:{task}:{str(sample.get('doc_hash') or sample['doc_id'])[:16]}")
            result.scores[column].append(value)
            doc = sample["doc"]
            result.samples.append({"task": task, "doc_id": sample["doc_id"], "question": str(doc.get("question", doc))[:500],
                                   "target": str(sample.get("target")), suite.metric: value})
    result.items = unique_ids(result.items)
    if result.items:
        present = [v for v in result.scores[column] if v is not None]
        result.metrics[column] = sum(present) / len(present)
        if len(configs) == 1:  # one task: its own metric is the suite's
            result.metrics.pop(f"{suite.name}_{configs[0]['task']}_{metric}", None)
    log.info("%s: %s", suite.name, {k: round(v, 4) for k, v in result.metrics.items()})
    return result
