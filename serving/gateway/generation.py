"""What chat and completions share: model resolution, sampling parameters, runs, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import Chunk, SamplingDefaults, SamplingParams, TokenLogprobs
from serving.gateway.catalog import ModelCatalog, ServedModel, split_adapter
from serving.gateway.errors import error_body, forgeline_error_body
from serving.gateway.protocol import FinishReason

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway-wide limits.

    Attributes:
        max_new_tokens: default ``max_tokens`` for chat, and the most any request may ask for.
    """

    max_new_tokens: int = 256


async def get_catalog(request: Request) -> ModelCatalog:
    """The catalog `create_app` stored on the app (``async``: no thread-pool hand-off)."""
    return request.app.state.catalog


def resolve_model(catalog: ModelCatalog, model: str) -> tuple[ServedModel, str | None]:
    """Resolve ``model`` to a served model and an optional adapter (``name:adapter``)."""
    return split_adapter(catalog, model)


def lineage_headers(served: ServedModel, adapter: str | None = None) -> dict[str, str]:
    """Response headers that say exactly which version, artifact and adapter answered."""
    headers = {"x-forgeline-model-version": f"{served.name}/{served.version}"}
    if served.artifact:
        headers["x-forgeline-engine-artifact"] = served.artifact
    if adapter:
        headers["x-forgeline-adapter"] = adapter
    return headers


def sampling_params(
    *,
    max_tokens: int | None,
    default_max_tokens: int,
    settings: GatewaySettings,
    temperature: float | None,
    top_p: float | None,
    stop: list[str],
    seed: int | None,
    max_tokens_field: str = "max_tokens",
    defaults: SamplingDefaults | None = None,
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
) -> SamplingParams:
    """Engine sampling parameters from wire fields, with the gateway's defaults and limits.

    ``max_tokens_field`` is the name the client used (chat: ``max_completion_tokens`` or
    ``max_tokens``), so an error names what the client actually sent. Unset ``temperature``
    and ``top_p`` take the model's ``defaults`` (its ``generation_config``), else 1.0.
    ``logprobs``: None for no log-probabilities, else how many alternatives per token.
    """
    defaults = defaults or SamplingDefaults()
    if temperature is None:
        temperature = defaults.temperature
    if top_p is None:
        top_p = defaults.top_p
    wanted = max_tokens if max_tokens is not None else min(default_max_tokens, settings.max_new_tokens)
    check_max_tokens(wanted, settings, max_tokens_field)
    return SamplingParams(
        max_tokens=wanted,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=stop,
        seed=seed,
        stop_token_ids=list(stop_token_ids or []),
        logprobs=logprobs,
    )


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One `SamplingParams` per choice of an ``n``-choice request.

    With a seed, choice ``i`` is seeded ``seed + i``: reproducible, yet the choices differ
    (one seed for all would sample ``n`` identical answers). Without one each choice draws
    its own random seed.
    """
    if params.seed is None:
        return [params] * n
    return [params if i == 0 else replace(params, seed=params.seed + i) for i in range(n)]


def check_max_tokens(wanted: int | None, settings: GatewaySettings, field: str) -> None:
    """Refuse a ``max_tokens`` (as the client named it) above the gateway's limit."""
    if wanted is not None and wanted > settings.max_new_tokens:
        raise ForgelineError(
            f"{field} is {wanted}, but this server allows at most {settings.max_new_tokens}; lower it",
            code=ErrorCode.INVALID_REQUEST,
            param=field,
        )


@dataclass
class Completion:
    """A finished, non-streamed generation (one choice).

    Attributes:
        logprobs: one report per generated token when they were asked for, else None.
    """

    text: str
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: list[TokenLogprobs] | None = None


async def open_streams(
    served: ServedModel, prompt: str, params: list[SamplingParams], adapter: str | None
) -> list[AsyncGenerator[Chunk, None]]:
    """`open_stream` for each choice at once, so the engine batches them together.

    If any fails up front, the others are closed and the first error raises.
    """
    opened = await asyncio.gather(*(open_stream(served, prompt, p, adapter) for p in params), return_exceptions=True)
    streams = [s for s in opened if not isinstance(s, BaseException)]
    failure = next((s for s in opened if isinstance(s, BaseException)), None)
    if failure is not None:
        for stream in streams:
            await stream.aclose()
        raise failure
    return streams


async def interleave(streams: list[AsyncGenerator[Chunk, None]]) -> AsyncGenerator[tuple[int, Chunk], None]:
    """``(choice index, chunk)`` from each stream in index order, round after round, until all finish.

    The engine decodes a request's choices in one batch, so taking one chunk of each in
    turn waits on none for long, and a client reads the choices in step.
    """
    active = list(enumerate(streams))
    try:
        while active:
            still: list[tuple[int, AsyncGenerator[Chunk, None]]] = []
            for index, stream in active:
                chunk = await anext(stream, None)
                if chunk is None:
                    continue
                yield index, chunk
                if chunk.finish_reason is None:
                    still.append((index, stream))
            active = still
    finally:
        for stream in streams:
            await stream.aclose()


async def open_stream(
    served: ServedModel, prompt: str, params: SamplingParams, adapter: str | None
) -> AsyncGenerator[Chunk, None]:
    """Start generating and wait for the first chunk before returning the stream.

    Waiting means an error the engine raises up front (prompt too long, unknown adapter)
    becomes a proper HTTP error instead of an error event after a 200.
    """
    stream = served.engine.generate(prompt, params, adapter=adapter)
    try:
        first = await anext(stream)
    except BaseException:
        await _close(stream)
        raise

    async def chunks() -> AsyncGenerator[Chunk, None]:
        try:
            yield first
            if first.finish_reason is None:
                async for chunk in stream:
                    yield chunk
        finally:
            # Close the engine's generator now (not at garbage collection) so a client that
            # disconnects frees its batch row immediately.
            await _close(stream)

    return chunks()


async def _close(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error event for a stream that already answered 200."""
    if isinstance(exc, ForgelineError):
        return sse(forgeline_error_body(exc))
    return sse(error_body("The server had an error while processing your request.", 500, code=ErrorCode.INTERNAL))
