"""The streamed pass-through relays a worker's SSE bytes, parsing only what the gateway needs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.engine.sse_relay import SseSplitter, WorkerEventError, inspect, rename_model, whole_events
from serving.gateway.event_stream import EventStreamResponse, LastEvents


def _event(payload: dict[str, Any], *, spaced: bool = False) -> bytes:
    sep = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(payload, separators=sep).encode() + b"\n\n"


def _chunk(content: str | None, *, model: str = "worker-model", usage: dict[str, int] | None = None, choices: bool = True, spaced: bool = False) -> bytes:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}] if choices else []}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return _event(body, spaced=spaced)


def test_splitter_yields_whole_events_only_and_keeps_the_partial_one() -> None:
    stream = _chunk("a") + _chunk("b") + b"data: [DONE]\n\n"
    splitter = SseSplitter()
    out = [splitter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)]
    assert b"".join(out) == stream
    assert all(piece == b"" or piece.endswith(b"\n\n") for piece in out)
    crlf = SseSplitter()
    assert crlf.feed(b"data: {}\r") == b"" and crlf.feed(b"\n\r\ndata: 1") == b"data: {}\n\n"
    assert crlf.rest() == b"data: 1\n\n" and crlf.rest() == b""


def test_whole_events_ends_with_a_last_event_made_whole() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"data: 1\n", b"\ndata: 2\n\nda", b'ta: {"usage": {"completion_tokens": 2}}'):
            yield piece

    async def runs() -> list[bytes]:
        return [run async for run in whole_events(pieces())]

    assert asyncio.run(runs()) == [b"data: 1\n\ndata: 2\n\n", b'data: {"usage": {"completion_tokens": 2}}\n\n']


def test_inspect_takes_out_done_and_the_usage_event_the_client_did_not_ask_for() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    # Spaced JSON (as Python's json.dumps writes it) is found as well as compact.
    data = _chunk("a", usage=None, spaced=True) + _chunk(None, choices=False, usage=usage, spaced=True) + b"data: [DONE]\n\n"
    block = inspect(data, keep_usage=False)
    assert block.done and block.usage == usage
    assert block.data == _chunk("a", spaced=True)
    kept = inspect(data, keep_usage=True)
    assert kept.data == _chunk("a", spaced=True) + _chunk(None, choices=False, usage=usage, spaced=True)
    # `"usage": null` on every chunk (OpenAI's shape with include_usage) is not a usage event.
    plain = _event({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None})
    assert inspect(plain, keep_usage=False) == inspect(plain, keep_usage=True)
    assert inspect(plain, keep_usage=False).usage is None


def test_inspect_with_usage_on_every_event_keeps_the_last_and_cuts_only_usage_only_events() -> None:
    # vLLM's continuous_usage_stats: usage on each chunk; the last one counts.
    first, second = ({"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n} for n in (1, 2))
    final = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = [_chunk("a", usage=first), _chunk("b", usage=second), _chunk(None, choices=False, usage=final)]
    block = inspect(b"".join(events) + b"data: [DONE]\n\n", keep_usage=False)
    assert block.done and block.usage == final and block.data == events[0] + events[1]
    # A usage-only event between others is cut out where it is; the end marker is not text.
    text = _chunk("say data: [DONE] and stop")
    middle = inspect(events[0] + events[2] + text, keep_usage=False)
    assert not middle.done and middle.usage == final and middle.data == events[0] + text
    assert inspect(events[0] + events[2] + text, keep_usage=True).data == events[0] + events[2] + text
    # A marker with more events after it (not a worker's order) still ends the answer.
    odd = inspect(events[0] + b"data:[DONE]\n\n" + text, keep_usage=False)
    assert odd.done and odd.data == events[0] + text


def test_inspect_counts_output_events_and_raises_on_an_in_band_error_only() -> None:
    data = _chunk("") + _chunk("hi") + _chunk("error") + _event({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})
    assert inspect(data, keep_usage=False).outputs() == 3  # the empty role chunk carries no output
    with pytest.raises(WorkerEventError, match="overloaded"):
        inspect(_chunk("a") + _event({"error": {"message": "overloaded", "code": 500}}), keep_usage=False)


def test_rename_model_touches_the_key_only_never_generated_text() -> None:
    text = 'say "model":"worker-model" \\ now'
    data = _chunk(text) + _chunk("b", spaced=True)
    renamed = rename_model(data, json.dumps('pub\\lic "m"').encode())
    events = [json.loads(line[6:]) for line in renamed.split(b"\n\n") if line]
    assert [e["model"] for e in events] == ['pub\\lic "m"'] * 2
    assert events[0]["choices"][0]["delta"]["content"] == text


def test_event_stream_sends_the_tail_with_the_end_and_stops_when_the_client_leaves() -> None:
    async def scenario(leave_after: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        sent: list[dict[str, Any]] = []
        trail: list[str] = []
        disconnect = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def events() -> Any:
            try:
                yield b"data: 1\n\n"
                if leave_after is not None:
                    await asyncio.sleep(3600)  # a stalled worker: only the disconnect ends this
                yield b"data: 2\n\n"
            finally:
                trail.append("closed")

        response = EventStreamResponse(events(), headers={"x-a": "b"}, tail=b"data: [DONE]\n\n")
        call = asyncio.ensure_future(response({"type": "http"}, receive, send))
        if leave_after is not None:
            await asyncio.sleep(leave_after)
            disconnect.set()
        await asyncio.wait_for(call, 5)
        return sent, trail

    sent, trail = asyncio.run(scenario(None))
    assert sent[0]["type"] == "http.response.start" and (b"x-a", b"b") in sent[0]["headers"]
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert sent[-1]["more_body"] is False and trail == ["closed"]
    left, trail = asyncio.run(scenario(0.05))
    assert [m.get("body") for m in left[1:]] == [b"data: 1\n\n"] and trail == ["closed"]


def test_last_events_leave_with_the_tail_and_what_follows_them_is_read_not_sent() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        sent: list[dict[str, Any]] = []
        trail: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        async def events() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            yield LastEvents(b"data: 2\n\n")
            trail.append("read on")  # a relay reading its worker's body to the end
            yield b"data: late error\n\n"

        await EventStreamResponse(events(), tail=b"data: [DONE]\n\n")({"type": "http"}, receive, send)
        return sent, trail

    sent, trail = asyncio.run(scenario())
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [
        (b"data: 1\n\n", True), (b"data: 2\n\ndata: [DONE]\n\n", False)
    ]
    assert trail == ["read on"]
