"""``POST /v1/completions``: the legacy text completion endpoint."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from registry.keys import KeyRecord
from serving.cpu_pool import run_cpu
from serving.engine.base import Chunk
from serving.gateway.auth import get_principal
from serving.gateway.event_stream import EventStreamResponse
from serving.gateway.generation import SSE_DONE, GatewaySettings, sampling_params, sse, sse_error
from serving.gateway.lifecycle import RequestLifecycle
from serving.gateway.protocol import (
    SSE_EVENT_SCHEMA,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "description": "The completion; with `stream: true`, "
                     "server-sent `text_completion` events ending in `data: [DONE]`.",
                     "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}},
)
async def create_completion(
    request: Request,
    body: CompletionRequest,
    principal: KeyRecord | None = Depends(get_principal),
) -> Response:
    """Create a text completion (OpenAI ``completions.create``)."""
    settings: GatewaySettings = request.app.state.settings  # as the chat route reads it
    run = await RequestLifecycle.begin(request, body.model, principal)
    try:
        body.refuse_unsupported(body.model, logprobs=run.engine.reports_logprobs)
        prompt = body.prompt_text()
        params = sampling_params(
            max_tokens=body.max_tokens,
            default_max_tokens=16,
            settings=settings,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            defaults=run.served.sampling_defaults,
            stop_token_ids=body.stop_token_ids,
            logprobs=body.logprobs,
        )
        prompt_tokens = await run_cpu(len(prompt), run.engine.count_tokens, prompt)  # large ones off the loop
        await run.admit(prompt_tokens)

        if not body.stream:
            done = await run.complete(prompt, params)
            response = CompletionResponse(
                model=body.model,
                choices=[
                    CompletionChoice(
                        text=done.text, finish_reason=done.finish_reason, logprobs=CompletionLogprobs.of(done.logprobs)
                    )
                ],
                usage=UsageInfo.of(prompt_tokens, done.completion_tokens),
            )
            return JSONResponse(response.model_dump(mode="json"), headers=run.headers)

        chunks = await run.stream(prompt, params)
    except BaseException as exc:
        run.fail(exc)
        raise
    events = _completion_events(chunks, model=body.model, prompt_tokens=prompt_tokens, include_usage=body.include_usage)
    return EventStreamResponse(events, headers=run.headers)


async def _completion_events(
    chunks: AsyncGenerator[Chunk, None], *, model: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    completion_tokens = 0
    offset = 0  # characters of token text reported so far: each chunk's text_offset continues it
    try:
        async for chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            if chunk.text or chunk.logprobs or chunk.finish_reason is not None:
                logprobs = CompletionLogprobs.of(chunk.logprobs, offset)
                if logprobs is not None:
                    offset += sum(len(t) for t in logprobs.tokens)
                choice = CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason, logprobs=logprobs)
                event = CompletionResponse(id=completion_id, created=created, model=model, choices=[choice])
                yield sse(event.model_dump(mode="json"))
        if include_usage:
            usage = UsageInfo.of(prompt_tokens, completion_tokens)
            final = CompletionResponse(id=completion_id, created=created, model=model, choices=[], usage=usage)
            yield sse(final.model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error must travel in the stream
        logger.exception("completion stream for %s failed", model)
        yield sse_error(exc)
    finally:
        await chunks.aclose()
    yield SSE_DONE
