"""``POST /v1/chat/completions``: render the chat template, generate, answer or stream.

A model served by workers that speak chat (``ServedModel.chat_relay``) skips the template:
the body passes through whole, and the worker's answer comes back with only ``model``
renamed, so tools, JSON schema, logprobs and ``n`` work wherever the worker has them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from registry.keys import KeyRecord
from serving.cpu_pool import run_cpu
from serving.engine.base import Chunk
from serving.engine.sse_relay import SseBlock, rename_model
from serving.engine.structured import StructuredEngine
from serving.gateway.auth import get_principal
from serving.gateway.event_stream import EventStreamResponse, LastEvents
from serving.gateway.generation import (
    SSE_DONE,
    Completion,
    GatewaySettings,
    check_max_tokens,
    choice_params,
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
from serving.gateway.structured import StructurePlan, ToolCallStream, parse_answer, plan_structure

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
) -> Response:
    """Create a chat completion (OpenAI ``chat.completions.create``)."""
    # Read here, not through a dependency: FastAPI solves each dependency per request.
    settings: GatewaySettings = request.app.state.settings
    run = await RequestLifecycle.begin(request, body.model, principal)
    if run.served.chat_relay is not None:
        return await _pass_through(run, body, settings)
    try:
        engine = run.engine
        structured = isinstance(engine, StructuredEngine)
        body.refuse_unsupported(body.model, logprobs=engine.reports_logprobs, structured=structured)
        plan: StructurePlan | None = None
        if structured:
            if body.tools or (body.response_format or {}).get("type", "text") != "text":
                # Off the event loop: a new adapter's template is read from its folder, schemas compile.
                plan = await asyncio.to_thread(plan_structure, body, engine, run.adapter)
            else:
                plan = plan_structure(body, engine, run.adapter)  # touches no engine: messages only
            messages: list[dict[str, Any]] = plan.messages
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        size = sum(len(m["content"]) for m in messages)
        render = (
            partial(engine.render_chat, tools=plan.tools) if plan is not None and plan.tools else engine.render_chat
        )
        if run.adapter is None:
            # Off the event loop when large: a multi-MB prompt must not stall other requests.
            prompt = await run_cpu(size, render, messages)
        else:
            # The adapter's own chat template; a new adapter is looked up once, off the event loop.
            prompt = await asyncio.to_thread(render, messages, adapter=run.adapter)
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
        if plan is not None and plan.guide is not None:
            params = replace(params, guide=plan.guide)
        # As at OpenAI: the prompt counts once, completion tokens are summed over the choices.
        per_choice = choice_params(params, body.choices)
        prompt_tokens = await run_cpu(len(prompt), engine.count_tokens, prompt)
        await run.admit(prompt_tokens)

        if not body.stream:
            done = await run.complete_choices(prompt, per_choice)
            response = ChatCompletionResponse(
                model=body.model,
                choices=[_choice(i, d, plan) for i, d in enumerate(done)],
                usage=UsageInfo.of(prompt_tokens, sum(d.completion_tokens for d in done)),
            )
            return JSONResponse(response.model_dump(mode="json"), headers=run.headers)

        chunks = await run.stream_choices(prompt, per_choice)
    except BaseException as exc:
        run.fail(exc)
        raise
    events = _chat_events(
        chunks,
        choices=body.choices,
        model=body.model,
        prompt_tokens=prompt_tokens,
        include_usage=body.include_usage,
        plan=plan,
    )
    return EventStreamResponse(events, headers=run.headers)


def _choice(index: int, done: Completion, plan: StructurePlan | None) -> ChatChoice:
    """One finished choice; with a tool format, its calls parsed out of the text."""
    content: str | None = done.text
    calls: list[dict[str, Any]] | None = None
    finish = done.finish_reason
    if plan is not None and plan.tool_format is not None:
        content, parsed = parse_answer(plan.tool_format, done.text, parallel=plan.parallel)
        if parsed:
            calls = [c.wire() for c in parsed]
            finish = "tool_calls" if finish == "stop" else finish
    return ChatChoice(
        index=index,
        message=ChatResponseMessage(content=content, tool_calls=calls),
        finish_reason=finish,
        logprobs=ChoiceLogprobs.of(done.logprobs),
    )


async def _pass_through(run: RequestLifecycle, body: ChatCompletionRequest, settings: GatewaySettings) -> Response:
    try:
        check_max_tokens(body.requested_max_tokens, settings, body.max_tokens_field)
        forward = body.passthrough_body()
        # The exact prompt size comes back in the worker's usage and is charged then.
        await run.admit(_estimated_prompt_tokens(body))
        if not body.stream:
            answer = await run.relay(forward)
            # The worker's bytes with the client's model name: not parsed and serialised again.
            renamed = rename_model(answer.body, json.dumps(body.model).encode())
            return Response(renamed, media_type="application/json", headers=run.headers)
        blocks = await run.relay_stream(forward, include_usage=body.include_usage)
    except BaseException as exc:
        run.fail(exc)
        raise
    relayed = _relayed_events(blocks, model=body.model)
    return EventStreamResponse(relayed, headers=run.headers, tail=SSE_DONE.encode())


def _estimated_prompt_tokens(body: ChatCompletionRequest) -> int:
    # About four characters a token: enough to refuse a prompt far over a key's tpm up front.
    return sum(len(m.text()) for m in body.messages) // 4


async def _relayed_events(blocks: AsyncGenerator[SseBlock, None], *, model: str) -> AsyncIterator[bytes]:
    """The worker's events as it sent them, with the client's model name: no event is parsed here."""
    name = json.dumps(model).encode()
    try:
        async for block in blocks:
            if block.done:
                # The worker's answer is whole: these events and [DONE] leave in one write.
                yield LastEvents(rename_model(block.data, name) if block.data else b"")
            elif block.data:
                yield rename_model(block.data, name)
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error must travel in the stream
        logger.warning("relayed chat stream for %s failed: %s", model, exc)
        yield sse_error(exc).encode()
    finally:
        await blocks.aclose()


async def _chat_events(
    chunks: AsyncGenerator[tuple[int, Chunk], None],
    *,
    choices: int,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    plan: StructurePlan | None = None,
) -> AsyncIterator[str]:
    """SSE events for ``choices`` interleaved choices; each event carries one choice's delta.

    With a tool format, each choice's text goes through a `ToolCallStream`: content deltas
    as they come, ``tool_calls`` deltas as calls complete, and ``finish_reason: tool_calls``.
    """
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(index: int, delta: DeltaMessage, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChatStreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice])
        return sse(chunk.model_dump(mode="json"))

    fmt = plan.tool_format if plan is not None else None
    parsers = [ToolCallStream(fmt, parallel=plan.parallel) for _ in range(choices)] if fmt is not None and plan else []
    completion_tokens = 0
    try:
        # OpenAI's first chunk of each choice carries the role and empty content.
        for index in range(choices):
            yield event(index, DeltaMessage(role="assistant", content=""))
        async for index, chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            text, calls = parsers[index].feed(chunk.text) if parsers else (chunk.text, [])
            finish = chunk.finish_reason
            if parsers and finish is not None:
                rest, more = parsers[index].finish()
                text, calls = text + rest, calls + more
                finish = "tool_calls" if finish == "stop" and parsers[index].calls else finish
            # Tokens without text of their own (a stop token, half a character) still report their logprobs.
            if text or chunk.logprobs:
                yield event(index, DeltaMessage(content=text), logprobs=ChoiceLogprobs.of(chunk.logprobs))
            for call in calls:
                yield event(index, DeltaMessage(tool_calls=[call]))
            if finish is not None:
                yield event(index, DeltaMessage(), finish)
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
