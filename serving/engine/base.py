"""The Engine seam: what the gateway needs from anything that generates text.

Implementations: `serving.engine.torch_engine.TorchEngine` (transformers, batched) and
`serving.engine.upstream.UpstreamEngine` (a pool of OpenAI-compatible workers:
``trtllm-serve``, vLLM, SGLang, ``forgeline worker``). Every capability the gateway asks
an engine about is a member of `Engine`, so the gateway never sniffs with ``getattr``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from serving.engine.sse_relay import SseBlock

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]

MAX_TOP_LOGPROBS = 20
"""Most alternatives reported per token (OpenAI's bound for ``top_logprobs``)."""

DEFAULT_MAX_BATCH_SIZE = 64
"""Most rows decoded together unless configured (`TorchEngine`, `ServeSpec`, ``forgeline worker``).

Here, beside the seam, rather than in the scheduler: the configuration modules that
default to it import this module already, and the scheduler's imports cost them ~0.1 s.

On a CPU a decode step's cost is mostly its weight reads and GEMMs, so more rows per step
cost less per token. 32 replaced 16 first (open loop at 16 requests/s on the `small`
benchmark model: 1.16-1.24x the tokens/s, 0.52-0.60x the TTFT p99). 64 replaced 32 once
arrivals outran the engine (same model and schedules over HTTP, 192 requests, 2 schedules
per rate, idle Xeon): TTFT p99 0.36-0.65x of 32 rows at 48 and 64 requests/s, at
1.06-1.19x the tokens/s, where `transformers serve` (which admits every arrival) was
level with 32 rows; the price is the gap between tokens of a full batch, 24 ms p50
instead of 14 (`transformers serve`: ~230). Below saturation nothing changes (a batch only
grows this large when that many requests are in flight). The KV cache grows with the rows
in flight, so lower it where memory is tight (vLLM's default is 256)."""

DEFAULT_BATCH_WINDOW_MS = 0.0
"""How long an idle engine waits after a request for more to prefill with it, unless configured.

0 since continuous batching: a request that arrives a moment later joins at the next step
(in the same forward as the decode step where the model allows, `fused_step`), so waiting
buys little and every request pays it. Open loop over HTTP on the `small` benchmark model
(96 requests, 3 schedules per rate, idle Xeon): TTFT p50 15-17 instead of 16-19 ms and p99
23-34 instead of 27-35 ms at 4 and 8 requests/s, where 5 ms lost to `transformers serve`'s
TTFT p99 at 4 requests/s in every schedule; 16 requests submitted at once still share one
prefill (the engine takes everything queued when it wakes) at 0.98x the tokens/s. Raise it
where a forward's fixed cost is large and bursts arrive a few milliseconds apart."""

EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The PyTorch engine's weight (and compute) dtype: ``auto`` is float32 on a CPU and the
artifact's own dtype on a GPU. ``bfloat16`` on a CPU with bf16 matrix instructions (AMX,
AVX-512 BF16) decodes about twice as fast (BENCHMARKS.md §2c), with bf16's rounding: greedy
outputs can differ from float32 where two tokens are nearly tied."""

ENGINE_DTYPES: tuple[str, ...] = get_args(EngineDtype)


class TokenGuide(Protocol):
    """Constrains one generated sequence token by token (a grammar, a JSON schema, a tool call).

    Engines call ``mask`` on the row's next-token logits before sampling and ``accept``
    with the token chosen; a guide that has reached an accepting end allows only stop tokens.
    """

    def mask(self, logits: Any) -> None:
        """Set the logits of every token not allowed next to ``-inf``, in place (one row, vocab-sized)."""
        ...

    def accept(self, token: int) -> None:
        """Advance past ``token``, which the engine sampled from the masked logits."""
        ...


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
        logprobs: None reports no log-probabilities; ``k`` (0..20) reports each generated
            token's log-probability and the ``k`` most likely tokens of the same step.
        guide: makes a fresh `TokenGuide` per generated sequence (guides hold state, and
            ``n`` > 1 decodes several sequences from one request), or None for free text.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    guide: Callable[[], TokenGuide] | None = None

    def __post_init__(self) -> None:
        # Engines trust these; the gateway validates wire input earlier with better messages.
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        self.stop = [s for s in self.stop if s]


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's own sampling defaults (its ``generation_config.json``), used when a request sets none.

    Attributes:
        temperature: the model's temperature, or None (then 1.0, OpenAI's default).
        top_p: the model's nucleus mass, or None (then 1.0).
    """

    temperature: float | None = None
    top_p: float | None = None

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> SamplingDefaults:
        """Read ``generation_config.json`` in ``folder``; no file or no values give no defaults."""
        path = Path(folder) / "generation_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        # As vLLM's `--generation-config auto`: the values count even without do_sample.
        temperature, top_p = config.get("temperature"), config.get("top_p")
        return cls(
            temperature=float(temperature) if isinstance(temperature, int | float) and temperature >= 0 else None,
            top_p=float(top_p) if isinstance(top_p, int | float) and 0 < top_p <= 1 else None,
        )


@dataclass(frozen=True)
class Logprob:
    """One token with its log-probability in the distribution a step sampled from.

    Attributes:
        token_id: the vocabulary id.
        token: the token's text (U+FFFD where its bytes are only part of a character).
        bytes: the token's exact UTF-8 bytes.
        logprob: natural log of its probability.
    """

    token_id: int
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """What one decode step reports: the generated token and the most likely alternatives.

    Attributes:
        chosen: the generated token.
        top: the ``SamplingParams.logprobs`` most likely tokens, most likely first.
    """

    chosen: Logprob
    top: list[Logprob]


@dataclass
class Chunk:
    """A piece of a streamed generation.

    Attributes:
        text: new text since the previous chunk (may be empty on the final chunk).
        token_ids: tokens generated since the previous chunk, including an eos token.
            Summed over a stream they give the completion token count.
        finish_reason: ``"stop"`` (eos or a stop string), ``"length"`` (max_tokens or the
            context window), or ``None`` while streaming.
        logprobs: with ``SamplingParams.logprobs`` set, one entry per token of ``token_ids``;
            otherwise None.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: what waits, what runs, which adapters are loaded."""

    waiting: int
    running: int
    loaded_adapters: tuple[str, ...]


@runtime_checkable
class Engine(Protocol):
    """Generates text for the gateway. One engine serves one model (plus its adapters)."""

    model_id: str

    reports_logprobs: bool
    """Whether `generate` honours `SamplingParams.logprobs` (fills `Chunk.logprobs`); the
    gateway refuses ``logprobs`` for an engine that would drop them."""

    step_listener: Callable[[int], None] | None
    """Set by the gateway's metrics; called with the number of rows of every decode step the
    engine runs itself. Engines whose workers decode (upstream pools) never call it."""

    @property
    def ready(self) -> bool:
        """True once `start` finished and until `stop` begins."""
        ...

    @property
    def serves_adapters(self) -> bool:
        """Whether requests may name an adapter (``name:adapter``) on this engine."""
        ...

    def stats(self) -> EngineStats | None:
        """What waits, what runs and which adapters are loaded, right now; None for an engine
        whose queues live in its workers (an upstream pool reports them per worker)."""
        ...

    async def start(self) -> None:
        """Load weights and start background workers."""
        ...

    async def stop(self) -> None:
        """Stop workers and release resources; in-flight requests end with an error."""
        ...

    def render_chat(self, messages: list[dict[str, str]], *, adapter: str | None = None) -> str:
        """Render chat messages with the chat template, ready for the assistant turn.

        With ``adapter``, the adapter's own chat template when it brings one (it may block
        to look a new adapter up: the gateway calls it off the event loop then).
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens `generate` would feed the model for ``text``."""
        ...

    def generate(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """Stream the completion of ``prompt``; the last chunk has a ``finish_reason``."""
        ...


@dataclass(frozen=True)
class RelayedAnswer:
    """A worker's whole answer: the bytes it sent (relayed with a cheap rewrite, not
    serialised again) and the same parsed (for its ``usage``)."""

    body: bytes
    json: dict[str, Any]


class ChatRelay(Protocol):
    """Takes OpenAI chat requests whole to workers that speak chat (tools, JSON schema, logprobs, n).

    The gateway keeps what it owns (auth, quotas, usage, lineage, metrics) and hands the
    body over with only the model name and limits changed; the worker's answer comes back
    as OpenAI JSON, its ``usage`` being what the gateway counts.
    """

    async def relay_chat(self, body: dict[str, Any], *, adapter: str | None = None) -> RelayedAnswer:
        """The worker's ``chat.completion`` answer to a non-streamed request."""
        ...

    def relay_chat_stream(
        self, body: dict[str, Any], *, adapter: str | None = None, include_usage: bool = False
    ) -> AsyncGenerator[SseBlock, None]:
        """The worker's ``chat.completion.chunk`` events as it sent them, in blocks of whole
        events; the last block's ``usage`` is the request's (its event stays in only with
        ``include_usage``)."""
        ...
