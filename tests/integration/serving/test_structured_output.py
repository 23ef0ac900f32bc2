"""``response_format`` and ``tools`` on the PyTorch engine, through the stock ``openai`` SDK.

The model is an *untrained* random-weight Llama: only constrained decoding can make its
answers valid JSON, so 200 of 200 valid answers measure the guide, not the model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background

pytestmark = pytest.mark.integration

TOOLS_TEMPLATE = Path(__file__).resolve().parents[3] / "recipes" / "templates" / "tiny-tools.jinja"

# Bounded (enum, integer range, maxLength, maxItems) so every document fits in max_tokens.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["shipped", "pending", "lost"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "note": {"type": "string", "maxLength": 8},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["status", "quantity", "note", "flags", "address"],
    "additionalProperties": False,
}
RESPONSE_FORMAT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Where an order is.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["order_id"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
REFUND = {
    "type": "function",
    "function": {
        "name": "start_refund",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "maxLength": 5}, "reason": {"enum": ["late", "broken"]}},
            "required": ["order_id", "reason"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Where is my order 28589?"}]


@pytest.fixture(scope="module")
def client(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from transformers import AutoTokenizer

    tools_model = tmp_path_factory.mktemp("structured") / "tools-base"
    shutil.copytree(tiny_base, tools_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = TOOLS_TEMPLATE.read_text()
    tokenizer.save_pretrained(tools_model)
    served = [
        ServedModel(name="tiny", version="1", engine=TorchEngine(tiny_base, device="cpu", model_id="tiny")),
        ServedModel(name="tools", version="1", engine=TorchEngine(tools_model, device="cpu", model_id="tools")),
    ]
    app = create_app(StaticCatalog(served), max_new_tokens=96)
    base_url, stop = serve_in_background(app)
    try:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        stop()


def _valid(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_json_schema_answers_of_a_random_model_all_validate(client: openai.OpenAI) -> None:
    answers: list[str] = []
    for seed in range(13):  # 13 x 8 unary choices
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, response_format=RESPONSE_FORMAT, n=8, seed=100 * seed, temperature=1.0, max_tokens=96  # type: ignore[arg-type]
        )
        assert all(c.finish_reason == "stop" for c in reply.choices)
        answers += [c.message.content or "" for c in reply.choices]
    for seed in range(100, 112):  # 12 x 8 streamed choices
        texts = [""] * 8
        finishes: list[str | None] = [None] * 8
        stream = client.chat.completions.create(
            model="tiny", messages=ASK, response_format=RESPONSE_FORMAT, n=8, seed=100 * seed, temperature=1.0,  # type: ignore[arg-type]
            max_tokens=96, stream=True,
        )
        for event in stream:
            for choice in event.choices:
                texts[choice.index] += choice.delta.content or ""
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        assert finishes == ["stop"] * 8
        answers += texts
    assert len(answers) == 200
    for text in answers:
        _valid(text, SCHEMA)
    assert len(set(answers)) > 50  # sampled, not one forced document


def test_json_object_gives_a_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, seed=1, max_tokens=96, temperature=0.5
    )
    if reply.choices[0].finish_reason == "stop":  # free keys may not close within max_tokens
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_a_schema_the_library_cannot_compile_is_a_400_naming_it(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "frob"}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, response_format=bad)  # type: ignore[arg-type]
    assert caught.value.body["param"] == "response_format.json_schema"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "yaml"})  # type: ignore[arg-type]
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]


def test_tools_on_a_template_without_tools_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[LOOKUP])  # type: ignore[list-item]
    assert caught.value.body["param"] == "tools"  # type: ignore[index]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "start_refund"}}])
def test_forced_calls_of_a_random_model_follow_the_function_schema(client: openai.OpenAI, choice: Any) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (LOOKUP, REFUND)}
    reply = client.chat.completions.create(
        model="tools", messages=ASK, tools=[LOOKUP, REFUND], tool_choice=choice, n=6, seed=4, max_tokens=80,  # type: ignore[list-item]
        parallel_tool_calls=False,
    )
    for c in reply.choices:
        assert c.finish_reason == "tool_calls"
        calls = c.message.tool_calls or []
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        call = calls[0].function  # type: ignore[union-attr]
        if isinstance(choice, dict):
            assert call.name == "start_refund"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_strict_tools_under_auto_give_text_or_valid_calls(client: openai.OpenAI) -> None:
    strict = {**LOOKUP, "function": {**LOOKUP["function"], "strict": True}}
    reply = client.chat.completions.create(
        model="tools", messages=ASK, tools=[strict], n=8, seed=7, max_tokens=80, temperature=1.0  # type: ignore[list-item]
    )
    for c in reply.choices:
        if c.message.tool_calls:
            assert c.finish_reason in ("tool_calls", "length")
            for call in c.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), LOOKUP["function"]["parameters"])  # type: ignore[union-attr]
        else:
            assert "<tool_call>" not in (c.message.content or "")


def test_streamed_tool_calls_arrive_as_openai_deltas(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": "tools", "messages": ASK, "tools": [LOOKUP, REFUND], "tool_choice": "required",
                               "seed": 2, "temperature": 1.0, "max_tokens": 96, "parallel_tool_calls": False}
    unary = (client.chat.completions.create(**request).choices[0].message.tool_calls or [])[0]
    deltas, finish = [], None
    for event in client.chat.completions.create(stream=True, **request):
        for choice in event.choices:
            deltas += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.function and first.function.name == unary.function.name and first.function.arguments == ""  # type: ignore[union-attr]
    assert all(d.index == 0 and d.id is None for d in rest)
    pieces = [d.function.arguments for d in rest if d.function and d.function.arguments]
    assert len(pieces) > 1  # piece by piece as generated, not one block
    assert "".join(pieces) == unary.function.arguments  # type: ignore[union-attr]  # the same seed: the same call
    jsonschema.validate(json.loads("".join(pieces)), {"lookup_order": LOOKUP, "start_refund": REFUND}[first.function.name]["function"]["parameters"])


def test_a_conversation_with_tool_results_renders(client: openai.OpenAI) -> None:
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "28589"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
    ]
    reply = client.chat.completions.create(model="tools", messages=messages, tools=[LOOKUP], max_tokens=4, seed=0)  # type: ignore[arg-type, list-item]
    assert reply.usage is not None and reply.usage.prompt_tokens > 60  # tools, call and result are in the prompt
    with pytest.raises(openai.BadRequestError) as caught:
        bad = [*messages[:1], {**messages[1], "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "lookup_order", "arguments": "{oops"}}]}]
        client.chat.completions.create(model="tools", messages=bad, tools=[LOOKUP])  # type: ignore[arg-type, list-item]
    assert caught.value.body["param"] == "messages[1].tool_calls[0].function.arguments"  # type: ignore[index]
