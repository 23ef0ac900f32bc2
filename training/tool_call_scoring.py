"""Scoring tool use: did the model call the right function with the right arguments, and answer right after?

Held-out rows in OpenAI's chat fine-tuning format with ``tools`` give two kinds of items,
one per assistant turn, each prompted with the conversation before it (rendered through
the model's chat template with the tools, as the gateway renders it):

- a **call item** (the turn has ``tool_calls``): ``tool_call_accuracy`` is 1 when the
  answer's calls name the same functions in the same order with arguments equal as JSON
  (``tool_name_accuracy``: the same functions in the same order, arguments aside);
  ``schema_valid_rate`` is 1 when every call names a declared tool and its arguments
  validate against that tool's ``parameters`` schema (and there is at least one call);
- an **answer item** (a plain-text turn after tool results): ``final_answer_exact_match``
  is exact match of the text (whitespace and case aside, as `training.evaluation`).

Reading calls out of generated text depends on the model family's format, which the
serving side knows (`serving.engine.tool_formats`); the caller passes that parser in
(``parse``), since training and serving never import each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .conversations import to_template_messages
from .evaluation import ItemScores, generate_answers, normalise

log = logging.getLogger(__name__)

Call = tuple[str, str]
"""A tool call as ``(function name, arguments as JSON text)``."""

ParseCalls = Callable[[str], tuple[str | None, list[Call]]]
"""Splits a generated answer into its text content and its tool calls."""


@dataclass(frozen=True)
class ToolItem:
    """One assistant turn of a tool-use conversation, to be generated and scored.

    Attributes:
        prompt: the conversation before the turn, rendered for the assistant to answer.
        calls: the expected calls (name, arguments as an object); None for a text answer.
        text: the expected text answer, for answer items.
        tools: the row's tools by name (their ``parameters`` schemas).
    """

    prompt: str
    calls: list[tuple[str, dict[str, Any]]] | None
    text: str
    tools: dict[str, dict[str, Any]]


def has_tool_rows(rows: list[dict[str, Any]]) -> bool:
    """Whether any row declares ``tools`` (and so is scored here)."""
    return any(row.get("tools") for row in rows)


def tool_items(rows: list[dict[str, Any]], tokenizer: Any, *, limit: int) -> list[ToolItem]:
    """The call and answer items of rows with ``tools`` (at most ``limit``)."""
    items: list[ToolItem] = []
    for row in rows:
        if not row.get("tools"):
            continue
        tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in row["tools"]}
        messages = row["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            follows_tool = any(m["role"] == "tool" for m in messages[:i])
            if not message.get("tool_calls") and not follows_tool:
                continue  # plain chat before any tool: not what these metrics measure
            prompt = tokenizer.apply_chat_template(
                to_template_messages(messages[:i]), tools=row["tools"], tokenize=False, add_generation_prompt=True
            )
            calls = None
            if message.get("tool_calls"):
                calls = [(c["function"]["name"], _object(c["function"].get("arguments", "{}"))) for c in message["tool_calls"]]
            items.append(ToolItem(prompt, calls, message.get("content") or "", tools))
            if len(items) >= limit:
                return items
    return items


def _object(arguments: Any) -> dict[str, Any]:
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    return value if isinstance(value, dict) else {}


def _schema_valid(calls: list[Call], tools: dict[str, dict[str, Any]]) -> bool:
    import jsonschema

    if not calls:
        return False
    for name, arguments in calls:
        if name not in tools:
            return False
        try:
            jsonschema.validate(json.loads(arguments), tools[name])
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            return False
    return True


def _same_calls(got: list[Call], expected: list[tuple[str, dict[str, Any]]]) -> bool:
    if len(got) != len(expected):
        return False
    for (name, arguments), (want_name, want_args) in zip(got, expected, strict=True):
        try:
            if name != want_name or json.loads(arguments) != want_args:
                return False
        except ValueError:
            return False
    return True


def score_tool_use(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, parse: ParseCalls, max_new_tokens: int,
    batch_size: int, max_samples: int,
) -> tuple[dict[str, float], ItemScores | None]:
    """Generate each item's answer greedily and score it (see the module docstring).

    Returns:
        ``tool_call_accuracy``, ``tool_name_accuracy`` and ``schema_valid_rate`` over call items, and
        ``final_answer_exact_match`` over answer items (each only when there are such
        items), with the per-item scores; empty when no row has tools.
    """
    items = tool_items(rows, tokenizer, limit=max_samples)
    if not items:
        return {}, None
    # Calls are longer than the short answers exact match is sized for: room for the longest expected turn.
    budget = max(max_new_tokens, *(_expected_tokens(tokenizer, i) + 16 for i in items))
    answers = generate_answers(model, tokenizer, [i.prompt for i in items], max_new_tokens=budget, batch_size=batch_size)
    return score_answers(items, answers, parse)


def _expected_tokens(tokenizer: Any, item: ToolItem) -> int:
    calls = [{"name": name, "arguments": arguments} for name, arguments in item.calls or []]
    return len(tokenizer(item.text + (json.dumps(calls) if calls else ""), add_special_tokens=False)["input_ids"])


def score_answers(items: list[ToolItem], answers: list[str], parse: ParseCalls) -> tuple[dict[str, float], ItemScores | None]:
    """Score generated ``answers`` (one per item) as `score_tool_use` does."""
    scores: dict[str, list[float]] = {
        "tool_call_accuracy": [], "tool_name_accuracy": [], "schema_valid_rate": [], "final_answer_exact_match": []
    }
    call_ids: list[str] = []
    for n, (item, answer) in enumerate(zip(items, answers, strict=True)):
        content, calls = parse(answer)
        if item.calls is not None:
            scores["tool_call_accuracy"].append(float(_same_calls(calls, item.calls)))
            scores["tool_name_accuracy"].append(float([n for n, _ in calls] == [n for n, _ in item.calls]))
            scores["schema_valid_rate"].append(float(_schema_valid(calls, item.tools)))
            call_ids.append(f"{hashlib.sha256(item.prompt.encode()).hexdigest()[:16]}#{n}")
        else:
            scores["final_answer_exact_match"].append(float(not calls and normalise(content or "") == normalise(item.text)))
    metrics = {name: sum(values) / len(values) for name, values in scores.items() if values}
    log.info("tool use: %d items: %s", len(items), {k: round(v, 4) for k, v in metrics.items()})
    # Per-item scores, for significance gates: the call items (the main metric).
    if not call_ids:
        return metrics, None
    return metrics, ItemScores(items=call_ids, scores={k: scores[k] for k in ("tool_call_accuracy", "schema_valid_rate")})
