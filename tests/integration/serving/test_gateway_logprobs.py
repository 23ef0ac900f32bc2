"""``logprobs`` / ``top_logprobs`` and ``n`` on the PyTorch engine, through the stock ``openai`` SDK."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest

from tests.integration.serving.conftest import Gateway

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def _reference(gateway: Gateway, max_tokens: int) -> tuple[str, list[float], list[list[float]]]:
    """Greedy text, each token's log-softmax and the top-5 values, from one transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gateway.artifact)
    model = AutoModelForCausalLM.from_pretrained(gateway.artifact, dtype=torch.float32).eval()
    enc = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
        n_prompt = enc["input_ids"].shape[1]
        logprobs = torch.log_softmax(model(input_ids=out).logits[0, n_prompt - 1 : -1].float(), dim=-1)
    ids = out[0, n_prompt:].tolist()
    chosen = [float(logprobs[i, t]) for i, t in enumerate(ids)]
    top = [row.topk(5).values.tolist() for row in logprobs]
    return tokenizer.decode(ids, skip_special_tokens=True), chosen, top


def test_greedy_logprobs_are_the_models_own_distribution(client: openai.OpenAI, gateway: Gateway) -> None:
    text, chosen, top = _reference(gateway, 8)
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = answer.choices[0]
    assert choice.message.content == text
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens == len(chosen)
    assert [t.logprob for t in content] == pytest.approx(chosen, abs=1e-4)
    for step, token in enumerate(content):
        values = [alt.logprob for alt in token.top_logprobs]
        assert len(values) == 5
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(top[step], abs=1e-4)
        assert token.top_logprobs[0].token == token.token  # greedy takes the most likely token
        assert token.bytes is not None and token.logprob <= 0
    if choice.finish_reason == "length":  # no stop token: the tokens' bytes spell the text exactly
        assert b"".join(bytes(t.bytes or []) for t in content).decode() == text


def test_logprobs_without_alternatives_and_none_unless_asked(client: openai.OpenAI) -> None:
    bare = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True)
    content = bare.choices[0].logprobs.content
    assert len(content) == bare.usage.completion_tokens
    assert all(t.top_logprobs == [] for t in content)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_bad_logprobs_and_n_are_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="requires `logprobs`"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=21)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="at most 8 choices") as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=9)
    assert info.value.param == "n"


def test_n_choices_with_a_seed_are_reproducible_and_usage_sums_them(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    answer = client.chat.completions.create(**kwargs, logprobs=True)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    per_choice = [len(c.logprobs.content) for c in answer.choices]
    assert answer.usage.completion_tokens == sum(per_choice)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + sum(per_choice)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]
    # Choices are seeded apart: a random tiny model does not repeat itself three times.
    assert len({c.message.content for c in answer.choices}) > 1


def test_streamed_choices_interleave_with_logprobs_in_each_delta(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2}
    whole = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(
        **kwargs, logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True}
    )
    text: dict[int, str] = defaultdict(str)
    logprobs: dict[int, list[float]] = defaultdict(list)
    finished: dict[int, str] = {}
    order: list[int] = []
    usage = None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            order.append(choice.index)
            text[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                for token in choice.logprobs.content or []:
                    assert len(token.top_logprobs) == 2
                    logprobs[choice.index].append(token.logprob)
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert set(order) == {0, 1} and order[:2] == [0, 1]
    assert sorted(finished) == [0, 1]
    for c in whole.choices:
        assert text[c.index] == c.message.content
        assert logprobs[c.index] == pytest.approx([t.logprob for t in c.logprobs.content], abs=1e-5)
    assert usage is not None and usage.completion_tokens == sum(len(v) for v in logprobs.values())


def test_completions_report_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == whole.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # Greedy takes the likeliest token (the dict keeps fewer keys where two tokens spell alike).
        assert 1 <= len(top) <= 3 and top.get(token, max(top.values())) == pytest.approx(value)
        assert max(top.values()) == pytest.approx(value)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=3, stream=True)
    tokens: list[str] = []
    offsets: list[int] = []
    for event in streamed:
        for choice in event.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2, logprobs=6)
    assert info.value.param == "logprobs"
