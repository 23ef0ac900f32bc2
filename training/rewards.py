"""Reward functions for GRPO: plain Python, called by TRL's ``GRPOTrainer``.

Every reward takes TRL's arguments — ``completions`` (strings, or lists of messages for
chat prompts) plus every other dataset column as a keyword list — and returns one float
per completion. Built-ins read the *answer* of a completion: the text of its last
``<answer>…</answer>`` block when there is one, else the whole completion, so the same
reward scores both R1-style and plain answers.

Your own reward is any function with that signature, named in the recipe as
``module:function`` (importable from the recipe's folder or ``PYTHONPATH``).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from registry.errors import FieldProblem

from .config import RewardSpec

log = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float]]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_R1 = re.compile(r"\s*<think>(?:(?!<think>).)*?</think>\s*<answer>(?:(?!<answer>).)*?</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The generated text of a completion, plain or conversational."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


def extract_answer(text: str) -> str:
    """The last ``<answer>…</answer>`` block's content, else the whole text, stripped."""
    found = _ANSWER.findall(text)
    return (found[-1] if found else text).strip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (``1,234.5``, ``-3``, ``.5``), or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the pattern only matches parseable numbers
        return None


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match(completions: Sequence[Any], reference_field: str = "answer", **kwargs: Any) -> list[float]:
    """1.0 when the answer equals the reference, ignoring case and surrounding/duplicate whitespace."""
    references = kwargs[reference_field]
    return [
        float(_normalise(extract_answer(completion_text(c))) == _normalise(str(ref)))
        for c, ref in zip(completions, references, strict=True)
    ]


def numeric_match(completions: Sequence[Any], reference_field: str = "answer", **kwargs: Any) -> list[float]:
    """1.0 when the last number of the answer equals the reference number (relative tolerance 1e-6)."""
    references = kwargs[reference_field]
    rewards = []
    for completion, ref in zip(completions, references, strict=True):
        expected = ref if isinstance(ref, int | float) else parse_number(str(ref))
        got = parse_number(extract_answer(completion_text(completion)))
        ok = expected is not None and got is not None and math.isclose(got, float(expected), rel_tol=1e-6, abs_tol=1e-9)
        rewards.append(float(ok))
    return rewards


def r1_format(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for exactly ``<think>…</think><answer>…</answer>`` (whitespace around is allowed)."""
    return [float(_R1.fullmatch(completion_text(c)) is not None) for c in completions]


def json_valid(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the answer parses as JSON (a surrounding ```json fence is allowed)."""
    rewards = []
    for completion in completions:
        text = extract_answer(completion_text(completion))
        fenced = _FENCE.match(text)
        try:
            json.loads(fenced.group(1) if fenced else text)
            rewards.append(1.0)
        except ValueError:
            rewards.append(0.0)
    return rewards


_BUILTINS: dict[str, RewardFunc] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "r1_format": r1_format,
    "json_valid": json_valid,
}


class RewardError(Exception):
    """A reward named in the recipe cannot be used; ``problem`` says where and how to fix it."""

    def __init__(self, problem: FieldProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _import(spec: RewardSpec, index: int, search_path: Path | None) -> RewardFunc:
    module_name, _, function_name = spec.name.partition(":")
    path = f"method.rewards[{index}].name"
    added = False
    if search_path is not None and str(search_path) not in sys.path:
        # Reward modules usually sit beside the recipe; torchrun workers get the same folder.
        sys.path.insert(0, str(search_path))
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(
            FieldProblem(path, f"cannot import module {module_name!r} ({err})", spec.name,
                         "put the module beside the recipe or on PYTHONPATH")
        ) from err
    finally:
        if added:
            sys.path.remove(str(search_path))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(
            FieldProblem(path, f"module {module_name!r} has no function {function_name!r}", spec.name,
                         "name a function defined in that module")
        )
    return function


def resolve_reward(spec: RewardSpec, index: int = 0, search_path: Path | None = None) -> RewardFunc:
    """The callable for one reward spec (a built-in bound to its reference field, or an imported function).

    Raises:
        RewardError: the module or function cannot be found.
    """
    if spec.name in _BUILTINS:
        function = _BUILTINS[spec.name]
        field = spec.reference_field()
        # partial keeps TRL's metric name (`rewards/<function>/mean`) the built-in's own name.
        return functools.partial(function, reference_field=field) if field else function
    return _import(spec, index, search_path)


def resolve_rewards(specs: Sequence[RewardSpec], search_path: Path | None = None) -> tuple[list[RewardFunc], list[float]]:
    """Reward callables and their weights, in recipe order.

    Raises:
        RewardError: for the first reward that cannot be resolved.
    """
    functions = [resolve_reward(spec, i, search_path) for i, spec in enumerate(specs)]
    log.info("rewards: %s", ", ".join(f"{s.name} x{s.weight:g}" for s in specs))
    return functions, [spec.weight for spec in specs]


def check_rewards(specs: Sequence[RewardSpec], search_path: Path | None = None) -> list[FieldProblem]:
    """Every reward that cannot be resolved, as recipe problems (nothing is called)."""
    problems = []
    for index, spec in enumerate(specs):
        try:
            resolve_reward(spec, index, search_path)
        except RewardError as err:
            problems.append(err.problem)
    return problems
