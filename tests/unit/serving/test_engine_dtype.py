"""The PyTorch engine serves in the dtype asked for (bf16: about twice as fast on CPUs with bf16 matrix instructions)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from registry.errors import ForgelineError
from serving.config import ServeSpec
from serving.engine.base import SamplingParams
from serving.engine.loading import check_dtype
from serving.engine.torch_engine import TorchEngine
from tests.support.families import build_family

PROMPTS = ["What is 2 + 3?", "The quick brown fox jumps over the lazy dog."]


def test_a_bf16_engine_decodes_exactly_as_generate_in_bf16(tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    # Large initial weights: greedy outputs depend on the input (see test_continuous_batching).
    folder = build_family("llama3", tmp_path_factory.mktemp("dtype"), initializer_range=1.0)
    engine = TorchEngine(folder, device="cpu", dtype="bfloat16", batch_window_ms=0, model_id="bf16")
    params = SamplingParams(max_tokens=12, temperature=0)

    async def one(prompt: str) -> list[int]:
        return [t async for chunk in engine.generate(prompt, params) for t in chunk.token_ids]

    asyncio.run(engine.start())
    try:
        assert {p.dtype for p in engine._model.parameters()} == {torch.bfloat16}
        got = [asyncio.run(one(p)) for p in PROMPTS]  # one at a time: no batch padding in play
        prompts = [engine._encode(p) for p in PROMPTS]
    finally:
        asyncio.run(engine.stop())
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=params.max_tokens)
        expected.append(out[0, len(ids) :].tolist())
    assert got == expected
    assert len({tuple(e) for e in expected}) == 2, "the two prompts must decode differently for the check to mean anything"


def test_an_unknown_dtype_is_refused_naming_the_field_and_choices(tmp_path: Path) -> None:
    with pytest.raises(ForgelineError) as caught:
        check_dtype("fp8")
    assert caught.value.param == "dtype" and "'fp8'" in caught.value.message and "bfloat16" in caught.value.message
    with pytest.raises(ForgelineError, match="'int4'"):
        TorchEngine(tmp_path, dtype="int4")  # type: ignore[arg-type]  # refused before any load
    with pytest.raises(ValidationError, match="dtype"):
        ServeSpec(dtype="fp8")  # type: ignore[arg-type]
    assert ServeSpec().dtype == "auto" and ServeSpec(dtype="bfloat16").dtype == "bfloat16"
