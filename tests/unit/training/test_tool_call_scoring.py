"""Tool-use scoring: call accuracy (function and JSON-equal arguments), schema validity, final answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.engine.tool_formats import HermesFormat
from training.tool_call_scoring import has_tool_rows, score_answers, tool_items

REPO = Path(__file__).resolve().parents[3]
EVAL = REPO / "recipes" / "data" / "tool-use" / "eval.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    tok.chat_template = (REPO / "recipes" / "templates" / "tiny-tools.jinja").read_text()
    return tok


def _parse(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = HermesFormat().parse(text)
    return content, [(c.name, c.arguments) for c in calls]


def test_items_are_the_call_turns_and_the_answers_after_tool_results(tokenizer) -> None:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()[:4]]
    assert has_tool_rows(rows) and not has_tool_rows([{"messages": []}])
    items = tool_items(rows, tokenizer, limit=100)
    calls = [i for i in items if i.calls is not None]
    answers = [i for i in items if i.calls is None]
    assert calls and answers
    first = calls[0]
    assert first.prompt.endswith("<|assistant|>\n") and "Tools: lookup_order(order_id) start_refund(order_id, reason) escalate(order_id, priority)" in first.prompt
    # An answer item is prompted with the call and its result.
    assert "<tool_call>" in answers[0].prompt and "<|tool|>" in answers[0].prompt
    assert len(tool_items(rows, tokenizer, limit=2)) == 2


def test_scores_tell_right_calls_wrong_arguments_invalid_ones_and_answers(tokenizer) -> None:
    rows = [r for r in map(json.loads, EVAL.read_text().splitlines()) if "order_id" in json.dumps(r["messages"][-3])][:1]
    items = tool_items(rows, tokenizer, limit=100)
    call, answer = items[0], items[1]
    assert call.calls is not None and answer.calls is None
    name, args = call.calls[0]
    right = f'<tool_call>{json.dumps({"name": name, "arguments": args})}</tool_call>'
    reordered = f'<tool_call>{json.dumps({"name": name, "arguments": dict(reversed(list(args.items())))})}</tool_call>'
    other_order = args["order_id"][:-1] + ("1" if args["order_id"][-1] != "1" else "2")  # valid, but not the one asked about
    wrong_value = f'<tool_call>{json.dumps({"name": name, "arguments": {**args, "order_id": other_order}})}</tool_call>'
    invalid = f'<tool_call>{json.dumps({"name": name, "arguments": {}})}</tool_call>'  # misses required keys
    unknown = '<tool_call>{"name": "drop_tables", "arguments": {}}</tool_call>'
    answers = [right, reordered, wrong_value, invalid, unknown, "plain text", answer.text.upper(), "something else"]
    scored = [call] * 6 + [answer] * 2
    metrics, per_item = score_answers(scored, answers, _parse)
    assert metrics["tool_call_accuracy"] == pytest.approx(2 / 6)
    assert metrics["schema_valid_rate"] == pytest.approx(3 / 6)  # right, reordered, other values
    assert metrics["tool_name_accuracy"] == pytest.approx(4 / 6)  # all but the unknown function and plain text
    assert metrics["final_answer_exact_match"] == pytest.approx(1 / 2)
    assert per_item is not None and per_item.scores["tool_call_accuracy"] == [1, 1, 0, 0, 0, 0]
    assert len(set(per_item.items)) == 6
