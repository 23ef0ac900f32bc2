"""Run suites on a model in memory: one table from kind to runner."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .judge import run_judge
from .lm_eval_suite import run_lm_eval
from .result import SuiteResult
from .safety import run_safety
from .spec import Suite
from .task import run_task

log = logging.getLogger(__name__)

Runner = Callable[[Any, Any, Any], SuiteResult]
RUNNERS: dict[str, Runner] = {
    "task": run_task,
    "lm_eval": run_lm_eval,
    "safety": run_safety,
    # "tool_calls": tool-call accuracy, from training/'s tool-call scoring once it exists.
}
"""Suites that score a model on its own (run on the version and on its base alike)."""


def run_suites(suites: list[Suite], model: Any, tokenizer: Any, *, model_name: str, base: bool = False) -> list[SuiteResult]:
    """Every suite's result on ``model``.

    ``base``: the model is the version's base. Judge suites compare the version with the
    production holder, so they run on the version only.
    """
    model.eval()
    results = []
    for suite in suites:
        if suite.kind == "judge":
            if base:
                continue
            run = lambda s, m, t: run_judge(s, m, t, model_name=model_name)  # noqa: E731
        else:
            run = RUNNERS[suite.kind]
        started = time.perf_counter()
        result = run(suite, model, tokenizer)
        log.info("suite %s (%s) on the %s in %.1fs: %s", suite.name, suite.kind, "base" if base else "version",
                 time.perf_counter() - started, {k: round(v, 4) for k, v in result.metrics.items()})
        results.append(result)
    return results
