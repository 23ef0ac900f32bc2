"""The engine's `TokenGuide` seam: each generated sequence is masked and advanced by its own guide."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.engine.base import SamplingParams
from serving.engine.torch_engine import TorchEngine


class _Cycle:
    """Allows exactly one token per step, walking through ``tokens`` in order."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.step, self.seen = tokens, 0, []

    def mask(self, logits: Any) -> None:
        keep = self.tokens[self.step % len(self.tokens)]
        value = logits[keep].clone()
        logits.fill_(float("-inf"))
        logits[keep] = value

    def accept(self, token: int) -> None:
        self.seen.append(token)
        self.step += 1


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_sampled_token_is_the_guides_choice(engine: TorchEngine, temperature: float) -> None:
    allowed = [engine._encode(" a")[-1], engine._encode(" b")[-1]]
    guides: list[_Cycle] = []

    def make() -> _Cycle:
        guides.append(_Cycle(allowed))
        return guides[-1]

    params = SamplingParams(max_tokens=6, temperature=temperature, seed=1, guide=make)

    async def main() -> list[list[int]]:
        async def one() -> list[int]:
            return [t async for chunk in engine.generate("Hello", params) for t in chunk.token_ids]

        return list(await asyncio.gather(one(), one()))

    outputs = asyncio.run(main())
    assert len(guides) == 2  # one guide per sequence, never shared
    for out in outputs:
        assert out == [allowed[i % 2] for i in range(6)]
    assert sorted(g.seen for g in guides) == sorted(outputs)
