"""Log-probabilities from the PyTorch engine's decode step, checked against a full forward pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.engine.base import Chunk, SamplingParams
from serving.engine.torch_engine import TorchEngine


def _generate(engine: TorchEngine, prompt: str, params: SamplingParams) -> list[Chunk]:
    async def main() -> list[Chunk]:
        return [chunk async for chunk in engine.generate(prompt, params)]

    return asyncio.run(main())


def _reference(artifact: Path, prompt_ids: list[int], out_ids: list[int], temperature: float) -> list:
    """Per generated token: log-softmax of the model's logits (over temperature) in one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + out_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_those_of_the_distribution_sampled_from(
    engine: TorchEngine, tiny_artifact: Path, temperature: float
) -> None:
    prompt = "The quick brown fox"
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, logprobs=5)
    chunks = _generate(engine, prompt, params)
    out_ids = [t for c in chunks for t in c.token_ids]
    reports = [lp for c in chunks for lp in (c.logprobs or [])]
    assert len(reports) == len(out_ids) == 6
    expected = _reference(tiny_artifact, engine._encode(prompt), out_ids, temperature)
    for step, (token, report) in enumerate(zip(out_ids, reports, strict=True)):
        assert report.chosen.token_id == token
        assert report.chosen.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert [e.logprob for e in report.top] == sorted((e.logprob for e in report.top), reverse=True)
        assert len(report.top) == 5
        best = expected[step].topk(5)
        assert [e.token_id for e in report.top] == best.indices.tolist()
        assert [e.logprob for e in report.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    if temperature == 0:
        # Greedy picks the most likely token, so it heads its own list.
        assert all(r.top[0].token_id == r.chosen.token_id for r in reports)
    if chunks[-1].finish_reason == "length":  # no stop token: the bytes spell exactly the text
        assert b"".join(bytes(r.chosen.bytes) for r in reports).decode() == "".join(c.text for c in chunks)

def test_no_logprobs_unless_asked(engine: TorchEngine) -> None:
    chunks = _generate(engine, "Hello", SamplingParams(max_tokens=3, temperature=0))
    assert all(c.logprobs is None for c in chunks)


def test_zero_alternatives_still_reports_the_chosen_token(engine: TorchEngine) -> None:
    chunks = _generate(engine, "Hello", SamplingParams(max_tokens=3, temperature=0, logprobs=0))
    reports = [lp for c in chunks for lp in (c.logprobs or [])]
    assert len(reports) == sum(len(c.token_ids) for c in chunks)
    assert all(r.top == [] and r.chosen.logprob <= 0 for r in reports)


def test_logprobs_bound_is_enforced() -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(max_tokens=1, logprobs=21)
