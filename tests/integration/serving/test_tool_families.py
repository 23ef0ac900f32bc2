"""Tool calls in the Llama-3.1 JSON and Mistral v3 formats, on tiny models of those families.

Random-weight llama3 and mixtral checkpoints (`tests.support.families`) with templates that
render ``tools`` as the real families do (`tests.support.tool_templates`), served on the
PyTorch engine behind the gateway and asked through the stock ``openai`` SDK. The gateway
tells the format from the template; forced calls (``required``, a named function) and
``strict`` tools under ``auto`` are constrained by the format's grammar, so even an untrained
model answers with calls that parse and follow the schema. Streamed calls arrive as OpenAI
deltas (name first, then the arguments piece by piece) that reassemble into the unary answer
for the same seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background
from tests.support.families import build_family
from tests.support.tool_templates import LLAMA31_TOOLS_TEMPLATE, MISTRAL_V3_TOOLS_TEMPLATE, with_template

pytestmark = pytest.mark.integration

LOOKUP = {"type": "function", "function": {
    "name": "lookup_order", "description": "Where an order is.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{3}$"}},
                   "required": ["order_id"], "additionalProperties": False}}}
ESCALATE = {"type": "function", "function": {
    "name": "escalate", "description": "Hand an order to a human agent.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{3}$"},
                                                    "priority": {"enum": ["low", "normal", "high"]}},
                   "required": ["order_id", "priority"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (LOOKUP, ESCALATE)}
ASK = [{"role": "user", "content": "Where is my order #482?"}]
MODELS = {"llama3": ("llama3", LLAMA31_TOOLS_TEMPLATE), "mistral": ("mixtral", MISTRAL_V3_TOOLS_TEMPLATE)}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("tool-families")
    served = []
    for model, (family, template) in MODELS.items():
        # Whole JSON schemas in the prompt, as the real templates put them: ~630 tokens of the tiny vocabulary.
        checkpoint = build_family(family, root / "checkpoints", max_position_embeddings=2048)
        folder = with_template(checkpoint, root / model, template)
        served.append(ServedModel(name=model, version="1", engine=TorchEngine(folder, device="cpu", model_id=model)))
    base_url, stop = serve_in_background(create_app(StaticCatalog(served), max_new_tokens=128))
    try:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        stop()


def _streamed(client: openai.OpenAI, **request: Any) -> tuple[list[Any], str | None, str]:
    deltas, finish, content = [], None, ""
    for event in client.chat.completions.create(stream=True, **request):
        for choice in event.choices:
            deltas += choice.delta.tool_calls or []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return deltas, finish, content


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "escalate"}}])
def test_a_forced_call_comes_back_parsed_and_streams_as_the_unary_answer(client: openai.OpenAI, model: str, choice: Any) -> None:
    request = {"model": model, "messages": ASK, "tools": [LOOKUP, ESCALATE], "tool_choice": choice, "seed": 3,
               "temperature": 1.0, "max_tokens": 128, "parallel_tool_calls": False}
    reply = client.chat.completions.create(**request)
    c = reply.choices[0]
    print(f"\n{model} {choice}: {c.message}")
    assert c.finish_reason == "tool_calls" and not c.message.content
    (call,) = c.message.tool_calls or []
    if isinstance(choice, dict):
        assert call.function.name == "escalate"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])  # type: ignore[union-attr]

    deltas, finish, content = _streamed(client, **request)
    assert finish == "tool_calls" and not content
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.arguments == ""  # type: ignore[union-attr]
    assert deltas[0].function.name == call.function.name  # type: ignore[union-attr]
    pieces = [d.function.arguments for d in deltas[1:] if d.function and d.function.arguments]
    assert len(pieces) > 1 and all(d.index == 0 and d.id is None for d in deltas[1:])  # per token, not one block
    assert "".join(pieces) == call.function.arguments  # type: ignore[union-attr]


@pytest.mark.parametrize("model", list(MODELS))
def test_strict_tools_under_auto_give_text_or_calls_that_follow_the_schema(client: openai.OpenAI, model: str) -> None:
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (LOOKUP, ESCALATE)]
    reply = client.chat.completions.create(model=model, messages=ASK, tools=strict, n=8, seed=11, temperature=1.0,  # type: ignore[arg-type]
                                           max_tokens=48)
    calls = 0
    for c in reply.choices:
        if c.message.tool_calls:
            calls += 1
            assert c.finish_reason in ("tool_calls", "length")
            for call in c.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])  # type: ignore[union-attr]
        else:
            text = (c.message.content or "").lstrip()
            assert not text.startswith(("{", "[{", "[TOOL_CALLS]", "<|python_tag|>")), text  # never a broken call
    print(f"\n{model} strict auto: {calls} of 8 answers are calls")
