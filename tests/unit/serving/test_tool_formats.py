"""Tool-call formats per model family: parsing whole answers, streaming them, and their grammars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.engine.tool_formats import (
    HermesFormat,
    Llama3JsonFormat,
    MistralFormat,
    detect_tool_format,
)
from serving.gateway.structured import ToolCallStream

HERMES = 'Let me look.<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "1"}}\n</tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>'
LLAMA = '<|python_tag|>{"name": "lookup_order", "parameters": {"order_id": "1"}}'
MISTRAL_V3 = '[TOOL_CALLS][{"name": "lookup_order", "arguments": {"order_id": "1"}}, {"name": "f", "arguments": {}}]'
MISTRAL_V11 = '[TOOL_CALLS]lookup_order[ARGS]{"order_id": "1"}[TOOL_CALLS]f[ARGS]{}'


@pytest.mark.parametrize(
    ("fmt", "text", "content", "names"),
    [
        (HermesFormat(), HERMES, "Let me look.", ["lookup_order", "f"]),
        (Llama3JsonFormat(), LLAMA, None, ["lookup_order"]),
        (Llama3JsonFormat(), '{"name": "lookup_order", "parameters": {"order_id": "1"}}', None, ["lookup_order"]),
        (MistralFormat(), MISTRAL_V3, None, ["lookup_order", "f"]),
        (MistralFormat(), MISTRAL_V3.removeprefix("[TOOL_CALLS]"), None, ["lookup_order", "f"]),  # tag decoded away
        (MistralFormat(), MISTRAL_V11, None, ["lookup_order", "f"]),
    ],
)
def test_each_family_parses_its_calls(fmt, text: str, content: str | None, names: list[str]) -> None:
    got_content, calls = fmt.parse(text)
    assert got_content == content
    assert [c.name for c in calls] == names
    assert json.loads(calls[0].arguments) == ({"order_id": "1"} if names[0] == "lookup_order" else {})
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("fmt", [HermesFormat(), Llama3JsonFormat(), MistralFormat()])
def test_plain_text_and_broken_calls_stay_content(fmt) -> None:
    for text in ("The order shipped.", '<tool_call>{"name": "f", "arguments": {bad</tool_call>', '{"name": 3}', "[{oops"):
        assert fmt.parse(text) == (text, [])


def _streamed(stream: ToolCallStream, pieces: list[str]) -> tuple[str, list[dict]]:
    content, deltas = "", []
    for piece in [*pieces, None]:
        text, new = stream.feed(piece) if piece is not None else stream.finish()
        content, deltas = content + text, deltas + new
    return content, deltas


def _reassembled(deltas: list[dict]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for d in deltas:
        calls.setdefault(d["index"], [d["function"].get("name"), ""])[1] += d["function"]["arguments"]
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("pieces", [[HERMES], list(HERMES), [HERMES[:5], HERMES[5:40], HERMES[40:]]])
def test_a_stream_sends_content_then_each_call_id_and_name_first(pieces: list[str]) -> None:
    content, deltas = _streamed(ToolCallStream(HermesFormat()), pieces)
    assert content == "Let me look."  # no fragment of the <tool_call> marker leaks into content
    assert deltas[0]["function"] == {"name": "lookup_order", "arguments": ""} and deltas[0]["id"].startswith("call_")
    assert all("id" not in d and "name" not in d["function"] for d in deltas[1:] if d["index"] == 0)
    firsts = [d for d in deltas if "id" in d]
    assert [d["index"] for d in firsts] == [0, 1] and firsts[1]["function"]["name"] == "f"
    _, unary = HermesFormat().parse(HERMES)
    assert _reassembled(deltas) == [(c.name, c.arguments) for c in unary]
    assert json.loads(unary[0].arguments) == {"order_id": "1"}


@pytest.mark.parametrize(("fmt", "text"), [
    (HermesFormat(), HERMES), (Llama3JsonFormat(), LLAMA), (Llama3JsonFormat(), LLAMA + '; {"name": "f", "parameters": {}}'),
    (MistralFormat(), MISTRAL_V3), (MistralFormat(), MISTRAL_V3.removeprefix("[TOOL_CALLS]")), (MistralFormat(), MISTRAL_V11),
])
def test_every_format_streams_arguments_token_by_token_as_the_unary_answer_has_them(fmt, text: str) -> None:
    content, deltas = _streamed(ToolCallStream(fmt), list(text))  # one character a token
    _, unary = fmt.parse(text)
    assert unary and _reassembled(deltas) == [(c.name, c.arguments) for c in unary]
    first_args = [d["function"]["arguments"] for d in deltas if d["index"] == 0]
    assert first_args[0] == "" and len(first_args) > 5  # the name first, then the arguments piece by piece
    assert json.loads(unary[0].arguments) == {"order_id": "1"}


def test_arguments_stream_before_the_call_closes() -> None:
    stream = ToolCallStream(HermesFormat())
    _, deltas = stream.feed('<tool_call>{"name": "lookup_order", "arguments": {"order_id": "4')
    assert [d["function"]["arguments"] for d in deltas] == ["", '{"order_id": "4']
    _, deltas = stream.feed('82"}}</tool_call>')
    assert [d["function"]["arguments"] for d in deltas] == ['82"}']  # the call's own closing brace is not an argument


def test_a_stream_without_calls_is_all_content_and_one_call_without_parallel() -> None:
    stream = ToolCallStream(HermesFormat())
    assert stream.feed("a <tool")[0] == "a "
    assert stream.finish() == ("<tool", [])
    single = ToolCallStream(HermesFormat(), parallel=False)
    single.feed(HERMES)
    single.finish()
    assert [c.name for c in single.calls] == ["lookup_order"]


def test_templates_tell_their_format() -> None:
    assert detect_tool_format("{% for tool in tools %}<tool_call>{% endfor %}").name == "hermes"
    assert detect_tool_format("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert detect_tool_format("{% if tools %}<|python_tag|>{% endif %}").name == "llama3_json"
    assert detect_tool_format("{{ messages }}") is None
    assert detect_tool_format(None) is None


@pytest.mark.parametrize("fmt", [HermesFormat(), Llama3JsonFormat(), MistralFormat()])
def test_each_forcing_grammar_compiles(fmt) -> None:
    from serving.engine.grammar import GuideCompiler
    from tests.support.tiny_model import load_tokenizer

    tokenizer = load_tokenizer()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
    compiler = GuideCompiler(tokenizer, [tokenizer.eos_token_id], len(tokenizer))
    guide = compiler.lark(fmt.grammar(tools, parallel=False), param="tools")()
    import torch

    logits = torch.zeros(len(tokenizer))
    guide.mask(logits)
    assert 0 < int(torch.isfinite(logits).sum()) < len(tokenizer)


def test_the_auto_grammar_allows_text_or_valid_calls_and_nothing_else() -> None:
    from serving.engine.grammar import GuideCompiler
    from tests.support.tiny_model import load_tokenizer

    tokenizer = load_tokenizer()
    tools = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}}}]
    make = GuideCompiler(tokenizer, [tokenizer.eos_token_id], len(tokenizer)).lark(
        HermesFormat().auto_grammar(tools, parallel=True) or "", param="tools")

    def accepts(text: str) -> bool:
        guide = make()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return all(guide._matcher.consume_token(t) for t in ids) and guide.accepting

    assert accepts("Your order shipped.")
    assert accepts('Let me check.<tool_call>{"name": "f", "arguments": {"x": 3}}</tool_call>')
    assert not accepts('<tool_call>{"name": "f", "arguments": {"x": "three"}}</tool_call>')
    assert not accepts('<tool_call>{"name": "g", "arguments": {}}</tool_call>')


@pytest.fixture(scope="module")
def matcher_of():
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[3] / "assets" / "tiny-base")
    ll = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=[hf.eos_token_id])

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        return all(matcher.consume_token(t) for t in hf.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    return accepts


STRICT = [{"type": "function", "function": {"name": "lookup_order", "strict": True, "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string", "pattern": "^#[0-9]{3}$"}}, "required": ["order_id"],
    "additionalProperties": False}}}]


@pytest.mark.parametrize(("fmt", "call", "bad_call"), [
    (HermesFormat(), '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "#482"}}</tool_call>',
     '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "482"}}</tool_call>'),
    (Llama3JsonFormat(), '{"name": "lookup_order", "parameters": {"order_id": "#482"}}',
     '{"name": "lookup_order", "parameters": {"order_id": "482"}}'),
    (MistralFormat(), '[TOOL_CALLS][{"name": "lookup_order", "arguments": {"order_id": "#482"}}]',
     '[TOOL_CALLS][{"name": "lookup_order", "arguments": {"order_id": "482"}}]'),
])
def test_strict_auto_grammars_allow_text_or_valid_calls_only(matcher_of, fmt, call: str, bad_call: str) -> None:
    grammar = fmt.auto_grammar(STRICT, parallel=True)
    assert matcher_of(grammar, "The order shipped.") and matcher_of(grammar, call)
    assert not matcher_of(grammar, bad_call)  # the pattern holds
    assert fmt.parse(call)[1] and matcher_of(fmt.grammar(STRICT, parallel=False), call)
    if not isinstance(fmt, HermesFormat):  # text that starts as a call but is none
        assert not matcher_of(grammar, call[: call.index('"name"')] + "oops")


def test_a_literal_that_is_a_control_token_matches_the_token_too(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from serving.engine.grammar import GuideCompiler
    from tests.support.families import build_family

    tok = AutoTokenizer.from_pretrained(build_family("mixtral", tmp_path))  # [INST] is a special token there
    inst = tok.convert_tokens_to_ids("[INST]")
    guide = GuideCompiler(tok, [tok.eos_token_id], len(tok)).lark('start: "[INST]" "x"', param="tools")()
    logits = torch.zeros(len(tok))
    guide.mask(logits)
    allowed = np.flatnonzero(np.isfinite(logits.numpy()))
    assert inst in allowed and len(allowed) > 1  # the control token, or the text spelled out
    guide.accept(inst)
    assert not guide.accepting
