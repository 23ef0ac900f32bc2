"""A fast fake OpenAI-compatible server: fixed tokens, no model.

It answers ``/v1/chat/completions`` and ``/v1/completions``, streamed (one SSE event per
token, ``stream_options.include_usage`` honoured, ending in ``data: [DONE]``) or not, with
``tokens`` copies of ``token`` (fewer when ``max_tokens`` asks for fewer), so whatever sits
in front of it is the only thing being measured. Events are built from pre-encoded
pieces; an optional ``--token-delay-ms`` spaces streamed tokens like a real decoder.

    python -m bench.fake_upstream --port 9000 [--tokens 16] [--token-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

logger = logging.getLogger(__name__)

MODEL = "fake"
PROMPT_TOKENS = 8  # reported in usage; the fake never tokenizes


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def create_app(*, tokens: int = 16, token: str = " tok", token_delay_s: float = 0.0) -> Starlette:
    """The fake server's ASGI app."""
    created = int(time.time())
    seq = 0

    def next_id(prefix: str) -> str:
        nonlocal seq
        seq += 1
        return f"{prefix}-{seq}"

    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}

    async def parse(request: Request) -> tuple[dict[str, Any], int]:
        body = json.loads(await request.body())
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or tokens
        return body, max(0, min(tokens, int(wanted)))

    async def health(_: Request) -> Response:
        return Response(b"ok")

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": created, "owned_by": "bench"}]})

    async def chat(request: Request) -> Response:
        body, n = await parse(request)
        cid = next_id("chatcmpl")
        model = body.get("model", MODEL)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": token * n}, "finish_reason": "length"}],
                    "usage": usage(n),
                }
            )
        head = f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},"model":{json.dumps(model)},"choices":'
        piece = head + _dumps([{"index": 0, "delta": {"content": token}, "finish_reason": None}]) + "}\n\n"
        first = head + _dumps([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]) + "}\n\n"
        last = head + _dumps([{"index": 0, "delta": {}, "finish_reason": "length"}]) + "}\n\n"
        tail = head + '[],"usage":' + _dumps(usage(n)) + "}\n\n" if _include_usage(body) else ""
        return StreamingResponse(_events(first, piece, n, last, tail, token_delay_s), media_type="text/event-stream")

    async def completions(request: Request) -> Response:
        body, n = await parse(request)
        cid = next_id("cmpl")
        model = body.get("model", MODEL)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "text": token * n, "finish_reason": "length", "logprobs": None}],
                    "usage": usage(n),
                }
            )
        head = f'data: {{"id":"{cid}","object":"text_completion","created":{created},"model":{json.dumps(model)},"choices":'
        piece = head + _dumps([{"index": 0, "text": token, "finish_reason": None, "logprobs": None}]) + "}\n\n"
        last = head + _dumps([{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]) + "}\n\n"
        tail = head + '[],"usage":' + _dumps(usage(n)) + "}\n\n" if _include_usage(body) else ""
        return StreamingResponse(_events("", piece, n, last, tail, token_delay_s), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return bool(options.get("include_usage"))


async def _events(first: str, piece: str, n: int, last: str, tail: str, delay_s: float) -> AsyncIterator[str]:
    if first:
        yield first
    for _ in range(n):
        if delay_s:
            await asyncio.sleep(delay_s)
        yield piece
    yield last
    if tail:
        yield tail
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fast fake OpenAI-compatible server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="pause before each streamed token")
    args = parser.parse_args(argv)
    import uvicorn

    app = create_app(tokens=args.tokens, token_delay_s=args.token_delay_ms / 1000.0)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
