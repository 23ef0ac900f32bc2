"""`UpstreamEngine` over a pool: failover before the first byte, never after, and pool config.

Workers are an httpx mock transport keyed by host, so each can refuse connections, fail
with 5xx, or break a stream, deterministically. (Real processes being SIGKILLed under load:
tests/integration/serving/test_upstream_pool.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from registry.errors import ForgelineError
from serving.config import ServeSpec
from serving.engine.base import SamplingParams
from serving.engine.pool import PoolPolicy
from serving.engine.upstream import UpstreamEngine

ANSWER = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}  # fmt: skip


def _sse(events: list[dict[str, Any]], done: bool = True) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + (b"data: [DONE]\n\n" if done else b"")


class Fleet:
    """Workers by host: ``ok``, ``refuse`` (connection refused), ``drop`` (connection closed
    before the answer), ``500``, or ``break`` (stream cut after one event)."""

    def __init__(self, modes: dict[str, str]) -> None:
        self.modes = modes
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, mode = request.url.host, self.modes[request.url.host]
        if mode == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200 if mode != "500" else 503)
        self.calls.append(host)
        if mode == "drop":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if mode == "500":
            return httpx.Response(500, json={"error": {"message": "worker fell over"}})
        body = json.loads(request.content)
        if not body.get("stream"):
            return httpx.Response(200, json=ANSWER)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
        if body["prompt" if "prompt" in body else "messages"] and mode == "break":
            return httpx.Response(200, content=_sse([chunk], done=False), headers={"content-type": "text/event-stream"})
        finish = {"choices": [{"index": 0, "text": "", "delta": {}, "finish_reason": "stop"}]}
        return httpx.Response(200, content=_sse([chunk, finish, {"choices": [], "usage": ANSWER["usage"]}]))


def _engine(tiny_base: Path, fleet: Fleet) -> UpstreamEngine:
    urls = [f"http://{host}:8000" for host in fleet.modes]
    return UpstreamEngine(urls, "m", tokenizer=tiny_base, upstream_api="chat", transport=httpx.MockTransport(fleet), policy=PoolPolicy(retry_budget_min=5))


def test_unary_chat_fails_over_and_the_refusing_worker_is_ejected(tiny_base: Path) -> None:
    fleet = Fleet({"w0": "ok", "w1": "ok", "w2": "ok"})
    engine = _engine(tiny_base, fleet)

    async def main() -> list[dict[str, Any]]:
        await engine.start()
        try:
            # They fail after the health checks passed: only requests find out.
            fleet.modes.update(w0="refuse", w1="500")
            return [(await engine.relay_chat({"model": "public", "messages": []})).json for _ in range(20)]
        finally:
            await engine.stop()

    answers = asyncio.run(main())
    assert all(a["choices"][0]["message"]["content"] == "hi" for a in answers)
    w0, w1, w2 = engine.pool.workers
    assert w0.ejections == 1 and w0.half_open  # ejected at its first refusal
    # Ejected at its third 500 in a row, so it never saw more than three requests.
    assert fleet.calls.count("w1") <= 3 and w1.ejections == (fleet.calls.count("w1") == 3)
    assert fleet.calls.count("w2") == 20 and w2.outstanding == 0


def test_a_lost_connection_is_retried_even_when_the_budget_is_spent_and_a_500_is_not(tiny_base: Path) -> None:
    # A worker SIGKILLed under load drops every request it was answering at once, more than
    # the budget's floor: those retries move load, they do not add it, so none may fail.
    no_budget = PoolPolicy(retry_budget_min=0, retry_budget_ratio=0.0, consecutive_failures=100)

    def engine_over(fleet: Fleet) -> UpstreamEngine:
        urls = [f"http://{host}:8000" for host in fleet.modes]
        return UpstreamEngine(urls, "m", tokenizer=tiny_base, upstream_api="chat", transport=httpx.MockTransport(fleet), policy=no_budget)

    async def dropped(fleet: Fleet) -> list[str]:
        engine = engine_over(fleet)
        await engine.start()
        try:
            fleet.modes["w0"] = "drop"  # after the health checks, with many requests in flight
            unary = [engine.relay_chat({"model": "public", "messages": []}) for _ in range(6)]
            answers = await asyncio.gather(*unary, *(_first_text(engine) for _ in range(6)))
            return [a if isinstance(a, str) else a.json["choices"][0]["message"]["content"] for a in answers]
        finally:
            await engine.stop()

    async def failed_500s(fleet: Fleet) -> int:
        engine = engine_over(fleet)
        await engine.start()
        try:
            fleet.modes["w0"] = "500"
            failed = 0
            for _ in range(200):  # routing is randomised: until w0 has had three requests
                try:
                    await engine.relay_chat({"model": "public", "messages": []})
                except ForgelineError:
                    failed += 1
                if fleet.calls.count("w0") == 3:
                    break
            return failed
        finally:
            await engine.stop()

    fleet = Fleet({"w0": "ok", "w1": "ok"})
    assert asyncio.run(dropped(fleet)) == ["hi"] * 12
    assert fleet.calls.count("w0") > 0  # the dropping worker was tried, and those requests were retried
    fleet = Fleet({"w0": "ok", "w1": "ok"})
    # Every 500 reached its client: a worker answering errors gets no retry from a spent budget.
    assert asyncio.run(failed_500s(fleet)) == fleet.calls.count("w0") == 3


def test_a_stream_fails_over_before_its_first_event_but_not_after(tiny_base: Path) -> None:
    fleet = Fleet({"w0": "ok", "w1": "ok"})
    engine = _engine(tiny_base, fleet)

    async def main() -> tuple[list[str], str]:
        await engine.start()
        try:
            fleet.modes["w0"] = "500"  # fails after the health check: only a request finds out
            first = [await _first_text(engine) for _ in range(4)]
            fleet.modes.update(w0="break", w1="break")
            with pytest.raises(ForgelineError, match="ended before the completion finished") as err:
                [c async for c in engine.generate("x", SamplingParams(max_tokens=4))]
            return first, err.value.code
        finally:
            await engine.stop()

    texts, code = asyncio.run(main())
    assert texts == ["hi"] * 4 and code == "unavailable"
    # A broken stream had already yielded a chunk: it was not retried elsewhere.
    assert fleet.calls[-1] in ("w0", "w1") and fleet.calls.count("w0") + fleet.calls.count("w1") == len(fleet.calls)


async def _first_text(engine: UpstreamEngine) -> str:
    stream = engine.relay_chat_stream({"model": "public", "messages": [{"role": "user", "content": "q"}]})
    try:
        block = await anext(stream)
        event = json.loads(block.payloads()[0])
        return str(event["choices"][0]["delta"]["content"])
    finally:
        await stream.aclose()


def test_serve_spec_pools() -> None:
    spec = ServeSpec(engine="upstream", upstream_url="http://a:8000", upstream_urls=["http://b:8000", "http://a:8000"])
    assert spec.worker_urls == ["http://a:8000", "http://b:8000"]
    assert ServeSpec(engine="upstream", upstream_dns="http://workers.svc:8000").worker_urls == []
    with pytest.raises(ValidationError, match="upstream_urls"):
        ServeSpec(engine="upstream")


def test_health_checks_scrape_vllm_queue_depth_and_kv_cache_use_and_routing_follows(tiny_base: Path) -> None:
    metrics = {
        "busy": 'vllm:num_requests_waiting{model_name="m"} 6.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.97\n',
        "idle": '# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{model_name="m"} 0.0\nvllm:gpu_cache_usage_perc{model_name="m"} 0.1\n',
    }

    def worker(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=metrics[request.url.host])
        return httpx.Response(200)

    engine = UpstreamEngine(["http://busy:8000", "http://idle:8000"], "m", tokenizer=tiny_base, scrape_queue=True,
                            transport=httpx.MockTransport(worker))  # fmt: skip

    async def main() -> list[str]:
        await engine.start()
        try:
            return [engine.pool.pick().url for _ in range(10)]
        finally:
            await engine.stop()

    picks = asyncio.run(main())
    busy, idle = engine.pool.workers
    assert (busy.queue_depth, busy.kv_cache_usage) == (6.0, 0.97) and (idle.queue_depth, idle.kv_cache_usage) == (0.0, 0.1)
    assert set(picks) == {"http://idle:8000"}


class _DiesMidAnswer(httpx.AsyncByteStream):
    """A 200 whose body breaks off half-way, as when a worker process dies while answering."""

    async def __aiter__(self):  # type: ignore[override]
        yield b'{"id": "c1", "choices": [{"text": "half an ans'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_a_unary_completion_whose_worker_dies_mid_answer_is_retried_on_another(tiny_base: Path) -> None:
    calls: list[str] = []

    def fleet(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200)
        calls.append(host)
        body = json.loads(request.content)
        assert body["stream"] is False and "stream_options" not in body  # a whole answer, not a stream
        if host == "w0":
            return httpx.Response(200, stream=_DiesMidAnswer())
        answer = {"choices": [{"index": 0, "text": "whole", "finish_reason": "length"}], "usage": {"completion_tokens": 3}}
        return httpx.Response(200, json=answer)

    engine = UpstreamEngine(["http://w0:8000", "http://w1:8000"], "m", tokenizer=tiny_base, transport=httpx.MockTransport(fleet),
                            policy=PoolPolicy(retry_budget_min=10))  # fmt: skip

    async def main() -> list[tuple[str, int, str]]:
        await engine.start()
        try:
            answers = []
            while "w0" not in calls and len(answers) < 50:  # the pool picks at random between equals
                answers.append(await engine.complete("hi", SamplingParams(max_tokens=3)))
            return answers
        finally:
            await engine.stop()

    answers = asyncio.run(main())
    assert "w0" in calls  # it was tried and died mid-answer...
    assert answers == [("whole", 3, "length")] * len(answers)  # ...and that request was answered by w1
    assert calls[-1] == "w1"


def test_a_unary_answer_that_times_out_is_not_sent_to_another_worker(tiny_base: Path) -> None:
    calls: list[str] = []

    def fleet(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        calls.append(request.url.host)
        raise httpx.ReadTimeout("no answer", request=request)

    engine = UpstreamEngine(["http://w0:8000", "http://w1:8000"], "m", tokenizer=tiny_base, transport=httpx.MockTransport(fleet),
                            policy=PoolPolicy(retry_budget_min=10))  # fmt: skip

    async def main() -> None:
        await engine.start()
        try:
            await engine.complete("hi", SamplingParams(max_tokens=3))
        finally:
            await engine.stop()

    with pytest.raises(ForgelineError, match="gave no answer within 600 s"):
        asyncio.run(main())
    assert len(calls) == 1  # the worker may still be generating: retrying would double its work
