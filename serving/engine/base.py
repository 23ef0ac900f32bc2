"""The Engine seam: what the gateway needs from anything that generates text.

Implementations: `serving.engine.torch_engine.TorchEngine` (transformers, batched) and,
later, an upstream OpenAI-compatible worker (``trtllm-serve``, vLLM, SGLang).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: most new tokens to generate (must be > 0).
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling mass, in (0, 1].
        stop: strings that end generation; they are not part of the returned text.
        seed: seeds this request's own random generator, so sampling is reproducible.
        stop_token_ids: token ids that end generation besides the model's own stop tokens
            (its ``generation_config.eos_token_id`` list, which engines always honour).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Engines trust these; the gateway validates wire input earlier with better messages.
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = [s for s in self.stop if s]


@dataclass
class Chunk:
    """A piece of a streamed generation.

    Attributes:
        text: new text since the previous chunk (may be empty on the final chunk).
        token_ids: tokens generated since the previous chunk, including an eos token.
            Summed over a stream they give the completion token count.
        finish_reason: ``"stop"`` (eos or a stop string), ``"length"`` (max_tokens or the
            context window), or ``None`` while streaming.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None


@runtime_checkable
class Engine(Protocol):
    """Generates text for the gateway. One engine serves one model (plus its adapters)."""

    model_id: str

    @property
    def ready(self) -> bool:
        """True once `start` finished and until `stop` begins."""
        ...

    async def start(self) -> None:
        """Load weights and start background workers."""
        ...

    async def stop(self) -> None:
        """Stop workers and release resources; in-flight requests end with an error."""
        ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's chat template, ready for the assistant turn."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens `generate` would feed the model for ``text``."""
        ...

    def generate(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """Stream the completion of ``prompt``; the last chunk has a ``finish_reason``."""
        ...
