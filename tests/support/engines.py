"""A do-nothing engine that declares every member of the `Engine` protocol, for gateway tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

from serving.engine.base import Chunk, EngineStats, SamplingParams


class StubEngine:
    """Generates nothing; subclasses override what a test needs (``generate``, ``stats``)."""

    model_id = "stub"
    reports_logprobs = False
    serves_adapters = False
    step_listener = None
    ready = True

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def render_chat(self, messages: list[dict[str, str]], *, adapter: str | None = None) -> str:
        return ""

    def count_tokens(self, text: str) -> int:
        return 0

    def stats(self) -> EngineStats | None:
        return None

    async def generate(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        if False:
            yield
