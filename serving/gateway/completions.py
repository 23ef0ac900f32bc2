"""``POST /v1/completions``: the legacy text completion endpoint."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.engine.base import Chunk
from serving.gateway.catalog import ModelCatalog
from serving.gateway.generation import (
    SSE_DONE,
    GatewaySettings,
    get_catalog,
    get_settings,
    lineage_headers,
    open_stream,
    resolve_model,
    run_to_completion,
    sampling_params,
    sse,
    sse_error,
)
from serving.gateway.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest,
    catalog: ModelCatalog = Depends(get_catalog),
    settings: GatewaySettings = Depends(get_settings),
) -> Response:
    """Create a text completion (OpenAI ``completions.create``)."""
    served, adapter = resolve_model(catalog, body.model)
    prompt = body.prompt_text()
    params = sampling_params(
        max_tokens=body.max_tokens,
        default_max_tokens=16,
        settings=settings,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
    )
    prompt_tokens = served.engine.count_tokens(prompt)
    headers = lineage_headers(served)

    if not body.stream:
        done = await run_to_completion(served, prompt, params, adapter)
        response = CompletionResponse(
            model=body.model,
            choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)],
            usage=UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=done.completion_tokens,
                total_tokens=prompt_tokens + done.completion_tokens,
            ),
        )
        return JSONResponse(response.model_dump(mode="json"), headers=headers)

    chunks = await open_stream(served, prompt, params, adapter)
    events = _completion_events(chunks, model=body.model, prompt_tokens=prompt_tokens, include_usage=body.include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _completion_events(
    chunks: AsyncGenerator[Chunk, None], *, model: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    completion_tokens = 0
    try:
        async for chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            if chunk.text or chunk.finish_reason is not None:
                event = CompletionResponse(
                    id=completion_id,
                    created=created,
                    model=model,
                    choices=[CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)],
                )
                yield sse(event.model_dump(mode="json"))
        if include_usage:
            usage = UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            final = CompletionResponse(id=completion_id, created=created, model=model, choices=[], usage=usage)
            yield sse(final.model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 - headers are sent; the error must travel in the stream
        logger.exception("completion stream for %s failed", model)
        yield sse_error(exc)
    finally:
        await chunks.aclose()
    yield SSE_DONE
