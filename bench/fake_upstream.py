"""A fast fake OpenAI-compatible server: fixed tokens, no model.

It answers ``/v1/chat/completions`` and ``/v1/completions``, streamed (one SSE event per
token, ``stream_options.include_usage`` honoured, ending in ``data: [DONE]``) or not, with
``tokens`` copies of ``token`` (fewer when ``max_tokens`` asks for fewer), so whatever sits
in front of it is the only thing being measured. Events are built from pre-encoded
pieces; an optional ``--token-delay-ms`` spaces streamed tokens (and delays unary answers
by as much) like a real decoder.

Chat requests that ask for more than text get what a vLLM worker would give them, so the
gateway's pass-through can be tested with the stock SDK: ``tools`` -> a call of the first
(or the chosen) tool with arguments that fit its JSON schema; ``response_format``
(``json_schema`` / ``json_object``) -> a JSON answer that fits; ``logprobs`` /
``top_logprobs`` -> per-token log-probabilities; ``n`` -> that many choices.
``GET /debug/requests`` answers how many generation requests this worker served and the
last body (and ``x-request-id`` and ``traceparent``) it got, so tests can see what reached
which worker. Given an OpenTelemetry ``tracer``, it records one span per generation request
as a child of the ``traceparent`` it received, as a traced worker (vLLM with
``--otlp-traces-endpoint``) does.

    python -m bench.fake_upstream --port 9000 [--tokens 16] [--token-delay-ms 0] [--name w0]
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


def create_app(
    *, tokens: int = 16, token: str = " tok", token_delay_s: float = 0.0, name: str = "fake", tracer: Any = None
) -> Starlette:
    """The fake server's ASGI app (``tracer``: an OpenTelemetry tracer for its request spans)."""
    created = int(time.time())
    seq = 0
    seen: dict[str, Any] = {"count": 0, "last": None, "name": name}

    def next_id(prefix: str) -> str:
        nonlocal seq
        seq += 1
        return f"{prefix}-{seq}"

    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}

    async def parse(request: Request) -> tuple[dict[str, Any], int]:
        body = json.loads(await request.body())
        seen["count"] += 1
        seen["last"] = body
        seen["request_id"] = request.headers.get("x-request-id")
        seen["traceparent"] = request.headers.get("traceparent")
        if tracer is not None:
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            parent = TraceContextTextMapPropagator().extract(dict(request.headers))
            with tracer.start_as_current_span(f"{name} {request.url.path}", context=parent, kind=SpanKind.SERVER):
                pass  # the span marks that this worker took part; the fake does no real work to time
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or tokens
        return body, max(0, min(tokens, int(wanted)))

    async def debug_requests(_: Request) -> Response:
        return JSONResponse(seen)

    async def health(_: Request) -> Response:
        return Response(b"ok")

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": created, "owned_by": "bench"}]})

    async def chat(request: Request) -> Response:
        body, n = await parse(request)
        cid = next_id("chatcmpl")
        model = body.get("model", MODEL)
        if _wants_more_than_text(body):
            return await _rich_chat(body, n, cid=cid, created=created, model=model, token=token, delay_s=token_delay_s)
        if not body.get("stream"):
            if token_delay_s:
                await asyncio.sleep(token_delay_s * n)
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
            Route("/debug/requests", debug_requests),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def _wants_more_than_text(body: dict[str, Any]) -> bool:
    tools = body.get("tools") and body.get("tool_choice") != "none"
    fmt = (body.get("response_format") or {}).get("type") in ("json_schema", "json_object")
    return bool(tools or fmt or body.get("logprobs") or (body.get("n") or 1) > 1)


def _instance(schema: dict[str, Any]) -> Any:
    """A value that fits a (simple) JSON schema: what a guided decoder would produce."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties") or {}
        return {key: _instance(sub) for key, sub in props.items()}
    if kind == "array":
        return [_instance(schema.get("items") or {"type": "string"})]
    return {"string": "tok", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "tok")


def _choice_message(body: dict[str, Any], n: int, token: str, index: int) -> tuple[dict[str, Any], str, list[str]]:
    """(message, finish_reason, tokens) of one choice."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if tools and choice != "none":
        wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        tool = next((t for t in tools if t.get("function", {}).get("name") == wanted), tools[0])["function"]
        arguments = json.dumps(_instance(tool.get("parameters") or {"type": "object"}))
        call = {"id": f"call_{index}", "type": "function", "function": {"name": tool["name"], "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls", [arguments]
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        text = json.dumps(_instance((fmt.get("json_schema") or {}).get("schema") or {"type": "object"}))
        return {"role": "assistant", "content": text}, "stop", [text]
    if fmt.get("type") == "json_object":
        text = json.dumps({"answer": token.strip()})
        return {"role": "assistant", "content": text}, "stop", [text]
    pieces = [f"{token}{index}" if index else token for _ in range(n)]
    return {"role": "assistant", "content": "".join(pieces)}, "length", pieces


def _logprobs(pieces: list[str], top: int) -> dict[str, Any]:
    content = []
    for i, piece in enumerate(pieces):
        alternatives = [{"token": piece, "logprob": -0.25 * (i % 3), "bytes": list(piece.encode())}]
        alternatives += [{"token": f" alt{k}", "logprob": -2.0 - k, "bytes": list(f" alt{k}".encode())} for k in range(1, top)]
        content.append({**alternatives[0], "top_logprobs": alternatives[:top]})
    return {"content": content, "refusal": None}


async def _rich_chat(
    body: dict[str, Any], n: int, *, cid: str, created: int, model: str, token: str, delay_s: float
) -> Response:
    choices, completion_tokens = [], 0
    for index in range(int(body.get("n") or 1)):
        message, finish, pieces = _choice_message(body, n, token, index)
        logprobs = _logprobs(pieces, int(body.get("top_logprobs") or 1)) if body.get("logprobs") else None
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs, "pieces": pieces})
        completion_tokens += len(pieces)
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens, "total_tokens": PROMPT_TOKENS + completion_tokens}
    if delay_s:
        await asyncio.sleep(delay_s * max(len(c["pieces"]) for c in choices))
    if not body.get("stream"):
        for c in choices:
            c.pop("pieces")
        answer = {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage}
        return JSONResponse(answer)
    events = []

    def chunk(choice: dict[str, Any]) -> str:
        payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        return f"data: {_dumps(payload)}\n\n"

    for c in choices:
        events.append(chunk({"index": c["index"], "delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
        message = c["message"]
        if message.get("tool_calls"):
            calls = [{"index": 0, **call} for call in message["tool_calls"]]
            events.append(chunk({"index": c["index"], "delta": {"tool_calls": calls}, "finish_reason": None}))
        else:
            for piece in c["pieces"]:
                logprobs = _logprobs([piece], int(body.get("top_logprobs") or 1)) if body.get("logprobs") else None
                events.append(chunk({"index": c["index"], "delta": {"content": piece}, "finish_reason": None, "logprobs": logprobs}))
        events.append(chunk({"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}))
    if _include_usage(body):
        events.append(f"data: {_dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n")
    events.append("data: [DONE]\n\n")

    async def stream() -> AsyncIterator[str]:
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream")


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
    parser.add_argument("--name", default="fake", help="shown by /debug/requests")
    args = parser.parse_args(argv)
    import uvicorn

    app = create_app(tokens=args.tokens, token_delay_s=args.token_delay_ms / 1000.0, name=args.name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
