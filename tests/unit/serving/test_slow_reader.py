"""A reader that falls behind the decode loop gets the same tokens in fewer chunks (fewer SSE writes)."""

from __future__ import annotations

import asyncio

from serving.engine.base import Chunk, SamplingParams
from serving.engine.request import take_queued
from serving.engine.torch_engine import TorchEngine


def test_a_slow_reader_gets_the_same_completion_in_fewer_chunks(engine: TorchEngine) -> None:
    params = SamplingParams(max_tokens=16, temperature=0)

    async def read(pause_s: float) -> list[Chunk]:
        chunks = []
        async for chunk in engine.generate("Where is my order?", params):
            chunks.append(chunk)
            await asyncio.sleep(pause_s)  # the engine decodes on meanwhile
        return chunks

    fast, slow = asyncio.run(read(0)), asyncio.run(read(0.5))
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast)
    assert [t for c in slow for t in c.token_ids] == [t for c in fast for t in c.token_ids]
    assert slow[-1].finish_reason == fast[-1].finish_reason is not None
    assert len(fast) > 3 and len(slow) <= 3, (len(fast), len(slow))  # the first, then what queued while it slept


def test_queued_chunks_merge_up_to_the_end_or_an_error() -> None:
    async def main() -> None:
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        assert take_queued(Chunk("a", [1]), queue) == (Chunk("a", [1]), None)  # nothing behind it
        for item in (Chunk("b", [2], logprobs=["lb"]), Chunk("c", [3], "stop", ["lc"]), Chunk("late", [9])):  # type: ignore[list-item]
            queue.put_nowait(item)
        merged, error = take_queued(Chunk("a", [1], logprobs=["la"]), queue)  # type: ignore[list-item]
        assert merged == Chunk("abc", [1, 2, 3], "stop", ["la", "lb", "lc"]) and error is None  # type: ignore[list-item]
        assert queue.qsize() == 1  # nothing is taken past the end of the stream
        failure = RuntimeError("decode failed")
        queue = asyncio.Queue()
        for item in (Chunk("b", [2]), failure, Chunk("x", [7])):
            queue.put_nowait(item)
        assert take_queued(Chunk("a", [1]), queue) == (Chunk("ab", [1, 2]), failure)

    asyncio.run(main())
