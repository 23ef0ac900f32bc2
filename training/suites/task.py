"""Task accuracy: generated answers matched exactly, by regular expression, or numerically."""

from __future__ import annotations

from typing import Any

from ..evaluation import generate_answers, item_id, to_examples
from .matching import matches
from .result import SuiteResult
from .rows import read_jsonl, unique_ids
from .spec import TaskSuite


def run_task(suite: TaskSuite, model: Any, tokenizer: Any) -> SuiteResult:
    """``{name}_accuracy``: the share of answers that match, generated in batches."""
    rows = read_jsonl(suite.data, required=())
    examples = to_examples(rows, tokenizer)[: suite.max_samples]
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples],
                               max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)
    right = [float(matches(a, e.expected, suite.match, extract=suite.extract, tolerance=suite.tolerance))
             for a, e in zip(answers, examples, strict=True)]
    result = SuiteResult(suite.name, suite.kind)
    if not examples:
        return result
    metric = f"{suite.name}_accuracy"
    result.metrics[metric] = sum(right) / len(right)
    result.items = unique_ids([f"{suite.name}:{item_id(e)}" for e in examples])
    result.scores[metric] = list(right)
    result.samples = [{"prompt": e.prompt, "expected": e.expected, "answer": a, "correct": r}
                      for e, a, r in zip(examples, answers, right, strict=True)]
    return result
