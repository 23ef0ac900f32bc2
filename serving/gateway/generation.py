"""What chat and completions share: model resolution, sampling parameters, runs, SSE."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import Chunk, SamplingDefaults, SamplingParams
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


def get_catalog(request: Request) -> ModelCatalog:
    """The catalog `create_app` stored on the app."""
    return request.app.state.catalog


def get_settings(request: Request) -> GatewaySettings:
    """The settings `create_app` stored on the app."""
    return request.app.state.settings


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
) -> SamplingParams:
    """Engine sampling parameters from wire fields, with the gateway's defaults and limits.

    ``max_tokens_field`` is the name the client used (chat: ``max_completion_tokens`` or
    ``max_tokens``), so an error names what the client actually sent. Unset ``temperature``
    and ``top_p`` take the model's ``defaults`` (its ``generation_config``), else 1.0.
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
    )


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
    """A finished, non-streamed generation."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason


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
