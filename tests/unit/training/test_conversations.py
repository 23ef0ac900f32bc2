"""Multi-turn and tool-use SFT rows: every weighted assistant turn is trained, nothing else is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.conversations import (
    ConversationError,
    check_conversation,
    is_conversation,
    template_renders_tools,
    tokenize_conversation,
)
from training.data import check_sft_row

REPO = Path(__file__).resolve().parents[3]
TOOLS_TEMPLATE = (REPO / "recipes" / "templates" / "tiny-tools.jinja").read_text()
LOOKUP = {"type": "function", "function": {"name": "lookup_order", "description": "Where an order is.",
                                           "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def row() -> dict:
    return {
        "tools": [LOOKUP],
        "messages": [
            {"role": "system", "content": "You help customers."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there, how can I help?", "weight": 0},
            {"role": "user", "content": "Where is order 123?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "123"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
            {"role": "assistant", "content": "Order 123 has shipped."},
        ],
    }


def trained_text(tokenizer, encoded: dict) -> str:
    ids = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    return tokenizer.decode(ids)


def test_every_weighted_assistant_turn_is_trained_and_nothing_else(tokenizer) -> None:
    encoded = tokenize_conversation(tokenizer, row())
    trained = trained_text(tokenizer, encoded)
    # Both weight-1 turns, the tool call in the template's own format, each with its end token.
    call = '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "123"}}</tool_call>'
    assert call in trained and "Order 123 has shipped." in trained
    assert trained.count(tokenizer.eos_token) == 2
    # Context is never trained: the weight-0 turn, user and system messages, the tool result, tool schemas.
    for context in ("Hi there", "Where is order", "You help customers", "shipped\"}", "Tools: lookup_order"):
        assert context not in trained, context
    # The whole conversation is in the input.
    full = tokenizer.decode(encoded["input_ids"])
    assert "Hi there, how can I help?" in full and '{"status": "shipped"}' in full and "Tools: lookup_order(order_id)" in full


def test_weight_one_on_every_turn_trains_every_turn(tokenizer) -> None:
    r = row()
    r["messages"][2]["weight"] = 1
    assert "Hi there, how can I help?" in trained_text(tokenizer, tokenize_conversation(tokenizer, r))


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    # Shows only the last assistant turn's content: earlier turns render differently later.
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m.role == 'assistant' and not loop.last -%}<|assistant|>[hidden]"
        "{%- else -%}<|{{ m.role }}|>{{ m.content }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    r = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(ConversationError, match="model.chat_template"):
        tokenize_conversation(tok, r)


def test_templates_without_tool_support_are_detected(tokenizer) -> None:
    from transformers import AutoTokenizer

    assert template_renders_tools(tokenizer)
    assert not template_renders_tools(AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base"))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r["messages"][4]["tool_calls"][0]["function"].update(name="drop_tables"), "does not declare"),
        (lambda r: r["messages"][4]["tool_calls"][0]["function"].update(arguments="{not json"), "JSON object"),
        (lambda r: r["messages"][5].update(tool_call_id="nope"), "no earlier assistant message made"),
        (lambda r: r["messages"][2].update(weight=0.5), "use 0 (context) or 1"),
        (lambda r: r["messages"][1].update(weight=1), "only assistant messages"),
        (lambda r: [m.update(weight=0) for m in r["messages"] if m["role"] == "assistant"], "trains nothing"),
    ],
)
def test_row_problems_name_the_message(change, problem: str) -> None:
    r = row()
    assert check_conversation(r) is None and check_sft_row(r) is None
    change(r)
    reason = check_sft_row(r)
    assert reason is not None and problem in reason


def test_plain_rows_are_not_conversations() -> None:
    assert not is_conversation({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]})
    assert not is_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert is_conversation(json.loads((REPO / "recipes" / "data" / "tool-use" / "train.jsonl").read_text().splitlines()[0]))


def test_rows_whose_trained_turns_fall_past_max_length_are_a_clear_error(tokenizer) -> None:
    from training.methods.sft import conversation_dataset

    with pytest.raises(ConversationError, match="raise train.max_length to at least"):
        conversation_dataset([row()], tokenizer, 16)
    assert len(conversation_dataset([row()], tokenizer, 4096)) == 1
