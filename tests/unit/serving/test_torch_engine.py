"""The PyTorch engine: batching keeps greedy results, stop strings, max_tokens, seeds, cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ForgelineError
from serving.engine.base import Chunk, SamplingParams
from serving.engine.torch_engine import TorchEngine

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy",
    "Serving engines batch requests and stream tokens back to clients. Numbers: 0 1 2 3",
]


async def _collect(engine: TorchEngine, prompt: str, params: SamplingParams) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(prompt, params)]


def _ids(chunks: list[Chunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


def _text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_batched_greedy_equals_transformers_generate(engine: TorchEngine, tiny_artifact: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_artifact)
    model = AutoModelForCausalLM.from_pretrained(tiny_artifact)
    max_tokens = [6, 12, 20]  # different lengths, so rows leave the batch at different steps
    expected = []
    for prompt, n in zip(PROMPTS, max_tokens, strict=True):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, enc["input_ids"].shape[1] :].tolist())

    prefills: list[int] = []
    forward = engine._forward

    def counting(*args: Any) -> Any:
        if args[0].shape[1] > 1:
            prefills.append(args[0].shape[0])
        return forward(*args)

    engine._forward = counting  # type: ignore[method-assign]

    async def main() -> list[list[Chunk]]:
        return await asyncio.gather(
            *(
                _collect(engine, p, SamplingParams(max_tokens=n, temperature=0))
                for p, n in zip(PROMPTS, max_tokens, strict=True)
            )
        )

    try:
        results = asyncio.run(main())
    finally:
        del engine._forward
    assert prefills == [3], "the three concurrent requests should be prefilled as one batch"
    for chunks, want, n in zip(results, expected, max_tokens, strict=True):
        assert _ids(chunks) == want
        assert _text(chunks) == tokenizer.decode(want, skip_special_tokens=True)
        assert chunks[-1].finish_reason == ("length" if len(want) == n else "stop")
        assert all(c.finish_reason is None for c in chunks[:-1])
    assert len(results[2]) > 2, "text should stream in several chunks"


def test_max_tokens_bounds_the_completion(engine: TorchEngine) -> None:
    chunks = asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=3, temperature=0)))
    assert len(_ids(chunks)) == 3
    assert chunks[-1].finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned(engine: TorchEngine) -> None:
    full = _text(asyncio.run(_collect(engine, PROMPTS[1], SamplingParams(max_tokens=24, temperature=0))))
    # A stop string from the middle of the greedy output: generation is a prefix of it.
    start = len(full) // 2
    stop = full[start : start + 2]
    assert stop.strip(), f"greedy output too short or blank to pick a stop string: {full!r}"
    chunks = asyncio.run(_collect(engine, PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, stop=[stop, "§§"])))
    text = _text(chunks)
    assert text == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert not any(stop in c.text for c in chunks)


def test_seeded_sampling_is_reproducible(engine: TorchEngine) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return _ids(asyncio.run(_collect(engine, "Hello", params)))

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first == again
    assert first != other


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 1e-45, 5e-324])
def test_a_vanishing_temperature_samples_greedily_instead_of_failing(engine: TorchEngine, temperature: float) -> None:
    # Logits divided by a temperature near float32's smallest value overflow to inf (a 500, found by the fuzz test).
    greedy = _ids(asyncio.run(_collect(engine, PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))))
    tiny = SamplingParams(max_tokens=5, temperature=temperature, seed=3, logprobs=2)
    chunks = asyncio.run(_collect(engine, PROMPTS[1], tiny))
    assert _ids(chunks) == greedy
    assert all(c.logprobs for c in chunks if c.token_ids)


def test_a_vanishing_top_p_still_samples_the_likeliest_token(engine: TorchEngine) -> None:
    # Found by the OpenAPI fuzzer: top_p=5e-324 rounds to 0 in float32 and masked every token (500).
    tiny = SamplingParams(max_tokens=4, temperature=1.0, top_p=5e-324, seed=1)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    assert _ids(asyncio.run(_collect(engine, PROMPTS[1], tiny))) == _ids(asyncio.run(_collect(engine, PROMPTS[1], greedy)))


def test_closing_the_stream_cancels_the_row(engine: TorchEngine) -> None:
    steps = 0
    forward = engine._forward

    def counting(*args: object) -> object:
        nonlocal steps
        steps += 1
        return forward(*args)

    engine._forward = counting  # type: ignore[method-assign]

    async def main() -> None:
        stream = engine.generate("Hello", SamplingParams(max_tokens=400, temperature=0))
        first = await anext(stream)
        assert first.finish_reason is None
        await stream.aclose()  # what the gateway does when the client disconnects
        await asyncio.sleep(0.3)

    try:
        asyncio.run(main())
        settled = steps
        time.sleep(0.2)
        assert steps == settled, "the engine kept decoding a cancelled request"
        assert steps < 50
    finally:
        del engine._forward
    # The engine still serves the next request.
    assert asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=2, temperature=0)))[-1].finish_reason


def test_render_chat_and_count_tokens(engine: TorchEngine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Hello"}])
    assert "Hello" in prompt
    assert engine.count_tokens(prompt) > engine.count_tokens("Hello") > 0


def test_a_counted_prompt_is_tokenized_once_and_generates_the_same(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0)
    uncounted = _ids(asyncio.run(_collect(engine, PROMPTS[1], params)))
    calls: list[str] = []
    encode = engine._encode
    monkeypatch.setattr(engine, "_encode", lambda text: calls.append(text) or encode(text))
    assert engine.count_tokens(PROMPTS[1]) > 0
    assert _ids(asyncio.run(_collect(engine, PROMPTS[1], params))) == uncounted
    assert calls == [PROMPTS[1]]  # counted once, and generate took the counted ids
    asyncio.run(_collect(engine, PROMPTS[1], params))
    assert calls == [PROMPTS[1]] * 2  # taken means forgotten: an uncounted prompt is tokenized again


def test_counted_prompts_are_bounded_by_entries_and_characters() -> None:
    from serving.engine.counted_prompts import CountedPrompts

    counted = CountedPrompts(max_entries=2, max_chars=10)
    counted.keep("a", [1])
    counted.keep("b", [2])
    counted.keep("c", [3])  # over two entries: the oldest ("a") falls out
    assert counted.take("a") is None and len(counted) == 2
    counted.keep("123456789", [9])  # 11 characters with "b" and "c": the oldest ("b") falls out
    assert counted.take("b") is None
    assert counted.take("c") == [3] and counted.take("123456789") == [9] and len(counted) == 0
    counted.keep("x" * 11, [1])  # longer than the bound itself: not kept
    assert len(counted) == 0


def test_too_long_request_is_refused(engine: TorchEngine) -> None:
    with pytest.raises(ForgelineError, match="maximum context length") as info:
        asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=10_000)))
    assert info.value.http_status == 400


def test_engine_that_is_not_started_is_unavailable(tiny_artifact: Path) -> None:
    engine = TorchEngine(tiny_artifact, device="cpu")
    assert not engine.ready
    with pytest.raises(ForgelineError) as info:
        asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=2)))
    assert info.value.http_status == 503


def test_stop_ends_in_flight_requests_with_unavailable(tiny_artifact: Path) -> None:
    engine = TorchEngine(tiny_artifact, device="cpu")

    async def main() -> None:
        await engine.start()
        stream = engine.generate("Hello", SamplingParams(max_tokens=400, temperature=0))
        await anext(stream)
        await engine.stop()
        assert not engine.ready
        with pytest.raises(ForgelineError) as info:
            async for _ in stream:
                pass
        assert info.value.http_status == 503

    asyncio.run(main())


def test_every_way_of_serving_a_torch_engine_defaults_to_the_same_batch_size() -> None:
    """`forgeline serve`, a gateway config's rollout section, `forgeline worker` and the engine itself
    decode the same number of rows together unless told otherwise (64: see `DEFAULT_MAX_BATCH_SIZE`)."""
    import inspect

    from forgeline.gateway_config import RolloutConfig
    from serving.config import ServeSpec
    from serving.engine.base import DEFAULT_MAX_BATCH_SIZE
    from serving.worker import artifact_catalog

    engine_default = inspect.signature(TorchEngine).parameters["max_batch_size"].default
    worker_default = inspect.signature(artifact_catalog).parameters["max_batch_size"].default
    assert DEFAULT_MAX_BATCH_SIZE == 64
    assert engine_default == worker_default == ServeSpec().max_batch_size == RolloutConfig().max_batch_size == 64
