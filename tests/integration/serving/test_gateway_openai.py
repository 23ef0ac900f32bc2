"""The gateway under uvicorn, driven by the stock ``openai`` SDK and raw HTTP."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.integration.serving.conftest import Gateway

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(gateway: Gateway) -> tuple[int, str]:
    """Prompt token count and 8-token greedy text for MESSAGES, computed with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gateway.artifact)
    model = AutoModelForCausalLM.from_pretrained(gateway.artifact)
    # transformers' own chat tokenization is the reference the engine must match.
    enc = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    prompt_tokens = enc["input_ids"].shape[1]
    return prompt_tokens, tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True)


def test_health_and_ready(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.base_url}/health").status_code == 200
    ready = httpx.get(f"{gateway.base_url}/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"tiny": True}


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "tiny@production", "tiny@1"]
    assert client.models.retrieve("tiny@production").id == "tiny@production"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completion(client: openai.OpenAI, gateway: Gateway, reference: tuple[int, str]) -> None:
    prompt_tokens, expected = reference
    raw = client.chat.completions.with_raw_response.create(
        model="tiny@production", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert raw.headers["x-forgeline-model-version"] == "tiny/1"
    assert raw.headers["x-forgeline-engine-artifact"] == str(gateway.artifact)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "tiny@production"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason in ("length", "stop")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == 8 or choice.finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_accepts_the_optional_fields_sdks_send(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
        n=1,
        user="u-1",
        metadata={"team": "qa"},
        store=False,
        presence_penalty=0,
        frequency_penalty=0,
        tool_choice="none",
        parallel_tool_calls=False,
        response_format={"type": "text"},
        logprobs=False,
        service_tier="auto",
    )
    assert completion.usage is not None and completion.usage.completion_tokens <= 4


def test_chat_streaming(client: openai.OpenAI, reference: tuple[int, str]) -> None:
    prompt_tokens, expected = reference
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == prompt_tokens
    assert usage_chunk.usage.total_tokens == prompt_tokens + usage_chunk.usage.completion_tokens


def test_raw_sse_ends_with_done(gateway: Gateway) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-forgeline-model-version"] == "tiny/1"
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] in ("length", "stop")


def test_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny@1", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    stream = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope@production", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "nope@production" in info.value.message


def test_invalid_fields_are_400_with_the_field_as_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=-1)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="n is 9, but .* at most 8 choices") as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=9)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="at most 64") as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1000)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens is 1000") as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=1000)
    assert info.value.param == "max_completion_tokens"


def test_fields_the_torch_engine_cannot_honour_are_refused_by_name(client: openai.OpenAI) -> None:
    """Nothing is silently dropped: each field either works or gets a 400 that names it."""
    refused: list[tuple[dict, str]] = [
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"prompt_cache_key": "k"}, "prompt_cache_key"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
        (
            {"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
            f"messages[{len(MESSAGES)}].tool_calls[0].function.arguments",
        ),
    ]
    for fields, param in refused:
        kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **fields}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.param == param, fields
        assert f"`{param}`" in info.value.message
    # Neutral values ask for nothing and are accepted.
    ok = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, store=False, service_tier="auto", metadata={}, n=1, presence_penalty=0
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: bogus"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"bogus": 1})


def test_malformed_bodies_get_openai_error_bodies(gateway: Gateway) -> None:
    url = f"{gateway.base_url}/v1/chat/completions"
    missing = httpx.post(url, json={"model": "tiny"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    assert missing.json()["error"]["type"] == "invalid_request_error"

    broken = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "JSON" in error["message"]

    unknown_route = httpx.post(f"{gateway.base_url}/v1/nothing", json={})
    assert unknown_route.status_code == 404
    assert unknown_route.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"


def test_client_disconnect_stops_decoding(gateway: Gateway) -> None:
    import time

    engine = gateway.engine
    steps = 0
    forward = engine._forward

    def slow(*args: object) -> object:
        nonlocal steps
        steps += 1
        time.sleep(0.02)  # slow enough that 64 steps outlast the disconnect
        return forward(*args)

    engine._forward = slow  # type: ignore[method-assign]
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 64, "stream": True}
        with httpx.stream("POST", f"{gateway.base_url}/v1/completions", json=body, timeout=60) as response:
            next(line for line in response.iter_lines() if line)
        time.sleep(0.5)
        settled = steps
        time.sleep(0.3)
        assert steps == settled < 40, "the engine kept decoding for a client that left"
    finally:
        del engine._forward
