"""Engines load one at a time and refuse weights that loaded incompletely."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from registry.errors import ForgelineError
from serving.engine.base import SamplingParams
from serving.engine.torch_engine import TorchEngine
from serving.gateway.catalog import ServedModel, StaticCatalog


def test_weights_missing_a_tensor_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["lm_head.weight"]  # transformers would only warn and initialise it at random
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    engine = TorchEngine(broken, device="cpu", model_id="broken")
    with pytest.raises(ForgelineError, match="loaded incompletely.*missing keys: lm_head.weight"):
        asyncio.run(engine.start())
    assert not engine.ready


def test_engines_started_together_all_load_the_same_weights(tiny_artifact: Path) -> None:
    """`serve --base a --base b --model m` starts its engines concurrently; each must load whole."""
    params = SamplingParams(max_tokens=6, temperature=0.0)

    async def main() -> list[str]:
        engines = [TorchEngine(tiny_artifact, device="cpu", model_id=f"e{i}", num_threads=1) for i in range(3)]
        catalog = StaticCatalog([ServedModel(f"m{i}", "1", e) for i, e in enumerate(engines)])
        await catalog.start()
        try:
            texts = []
            for engine in engines:
                texts.append("".join([c.text async for c in engine.generate("Hello", params)]))
            return texts
        finally:
            await catalog.stop()

    for _ in range(2):
        texts = asyncio.run(main())
        assert len(set(texts)) == 1 and texts[0], texts  # identical greedy output: identical weights
