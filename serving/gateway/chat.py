"""``POST /v1/chat/completions``: render the chat template, generate, answer or stream.

A model served by workers that speak chat (``ServedModel.chat_relay``) skips the template:
the body passes through whole, and the worker's answer comes back with only ``model``
renamed, so tools, JSON schema, logprobs and ``n`` work wherever the worker has them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from registry.keys import KeyRecord
from serving.cpu_pool import run_cpu
from serving.engine.base import Chunk
from serving.gateway.auth import get_principal
from serving.gateway.generation import (
    SSE_DONE,
    GatewaySettings,
    check_max_tokens,
    choice_params,
    get_settings,
    sampling_params,
    sse,
    sse_error,
)
from serving.gateway.lifecycle import RequestLifecycle
from serving.gateway.protocol import (
    SSE_EVENT_SCHEMA,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    UsageInfo,
)

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "description": "The completion; with `stream: true`, "
                     "server-sent `chat.completion.chunk` events ending in `data: [DONE]`.",
                     "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}},
)
async def create_chat_completion(
    request: Request,
    body: ChatCompletionRequest,
    principal: KeyRecord | None = Depends(get_principal),
    settings: GatewaySettings = Depends(get_settings),
) -> Response:
    """Create a chat completion (OpenAI ``chat.completions.create``)."""
    run = await RequestLifecycle.begin(request, body.model, principal)
    if run.served.chat_relay is not None:
        return await _pass_through(run, body, settings)
    try:
        engine = run.engine
        body.refuse_unsupported(body.model, logprobs=engine.reports_logprobs)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        size = sum(len(m["content"]) for m in messages)
        if run.adapter is None:
            # Off the event loop when large: a multi-MB prompt must not stall other requests.
            prompt = await run_cpu(size, engine.render_chat, messages)
        else:
            # The adapter's own chat template; a new adapter is looked up once, off the event loop.
            prompt = await asyncio.to_thread(engine.render_chat, messages, adapter=run.adapter)
        params = sampling_params(
            max_tokens=body.requested_max_tokens,
            max_tokens_field=body.max_tokens_field,
            default_max_tokens=settings.max_new_tokens,
            settings=settings,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            defaults=run.served.sampling_defaults,
            logprobs=body.top_logprobs_wanted,
        )
        # As at OpenAI: the prompt counts once, completion tokens are summed over the choices.
        per_choice = choice_params(params, body.choices)
        prompt_tokens = await run_cpu(len(prompt), engine.count_tokens, prompt)
        await run.admit(prompt_tokens)

        if not body.stream:
            done = await run.complete_choices(prompt, per_choice)
            response = ChatCompletionResponse(
                model=body.model,
                choices=[
                    ChatChoice(
                        index=i,
                        message=ChatResponseMessage(content=d.text),
                        finish_reason=d.finish_reason,
                        logprobs=ChoiceLogprobs.of(d.logprobs),
                    )
                    for i, d in enumerate(done)
                ],
                usage=UsageInfo.of(prompt_tokens, sum(d.completion_tokens for d in done)),
            )
            return JSONResponse(response.model_dump(mode="json"), headers=run.headers)

        chunks = await run.stream_choices(prompt, per_choice)
    except BaseException as exc:
        run.fail(exc)
        raise
    events = _chat_events(
        chunks, choices=body.choices, model=body.model, prompt_tokens=prompt_tokens, include_usage=body.include_usage
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=run.headers)


async def _pass_through(run: RequestLifecycle, body: ChatCompletionRequest, settings: GatewaySettings) -> Response:
    try:
        check_max_tokens(body.requested_max_tokens, settings, body.max_tokens_field)
        forward = body.passthrough_body()
        # The exact prompt size comes back in the worker's usage and is charged then.
        await run.admit(_estimated_prompt_tokens(body))
        if not body.stream:
            answer = await run.relay(forward)
            answer["model"] = body.model
            return JSONResponse(answer, headers=run.headers)
        events = await run.relay_stream(forward)
    except BaseException as exc:
        run.fail(exc)
        raise
    relayed = _relayed_events(events, model=body.model, include_usage=body.include_usage)
    return StreamingResponse(relayed, media_type="text/event-stream", headers=run.headers)


def _estimated_prompt_tokens(body: ChatCompletionRequest) -> int:
    # About four characters a token: enough to refuse a prompt far over a key's tpm up front.
    return sum(len(m.text()) for m in body.messages) // 4


async def _relayed_events(
    events: AsyncGenerator[dict[str, Any], None], *, model: str, include_usage: bool
) -> AsyncIterator[str]:
    try:
        async for event in events:
            if not event.get("choices") and event.get("usage") and not include_usage:
                continue  # asked of the worker for accounting, not by the client
            event["model"] = model
            yield sse(event)
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error must travel in the stream
        logger.warning("relayed chat stream for %s failed: %s", model, exc)
        yield sse_error(exc)
    finally:
        await events.aclose()
    yield SSE_DONE


async def _chat_events(
    chunks: AsyncGenerator[tuple[int, Chunk], None],
    *,
    choices: int,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events for ``choices`` interleaved choices; each event carries one choice's delta."""
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(index: int, delta: DeltaMessage, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChatStreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice])
        return sse(chunk.model_dump(mode="json"))

    completion_tokens = 0
    try:
        # OpenAI's first chunk of each choice carries the role and empty content.
        for index in range(choices):
            yield event(index, DeltaMessage(role="assistant", content=""))
        async for index, chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            # Tokens without text of their own (a stop token, half a character) still report their logprobs.
            if chunk.text or chunk.logprobs:
                yield event(index, DeltaMessage(content=chunk.text), logprobs=ChoiceLogprobs.of(chunk.logprobs))
            if chunk.finish_reason is not None:
                yield event(index, DeltaMessage(), chunk.finish_reason)
        if include_usage:
            usage = UsageInfo.of(prompt_tokens, completion_tokens)
            final = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage)
            yield sse(final.model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error must travel in the stream
        logger.exception("chat stream for %s failed", model)
        yield sse_error(exc)
    finally:
        await chunks.aclose()
    yield SSE_DONE
