"""What `UpstreamEngine` sends to a ``trtllm-serve`` worker, and how it reads the stream.

The worker side is an httpx mock transport standing in for ``trtllm-serve``: it records
the request bodies and answers in the OpenAI streaming format. (The real HTTP path runs
against ``forgeline worker`` in tests/integration/serving/test_upstream_worker.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.errors import ForgelineError, ModelNotFoundError
from serving.engine.base import Chunk, Engine, SamplingParams
from serving.engine.upstream import UNKNOWN_TOKEN_ID, UpstreamEngine

# TensorRT-LLM's per-request LoRA over HTTP (https://nvidia.github.io/TensorRT-LLM/features/lora.html, "Client Usage").
DOCUMENTED_LORA_REQUEST = {"lora_name", "lora_int_id", "lora_path"}


def _sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


class FakeWorker:
    """Records requests; streams ``pieces`` then a usage event, or fails as told."""

    def __init__(self, pieces: list[str], *, status: int = 200, error: dict[str, Any] | None = None, truncate: bool = False) -> None:
        self.pieces, self.status, self.error, self.truncate = pieces, status, error, truncate
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/metrics":
            return httpx.Response(200, text='[{"gpuMemUsage": 1}]')
        self.bodies.append(json.loads(request.content))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": self.error or {"message": "boom"}})
        events: list[dict[str, Any]] = [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in self.pieces]
        events.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(self.pieces), "total_tokens": 3 + len(self.pieces)}})
        content = _sse(events)
        if self.truncate:  # the connection closes cleanly after two events: no finish, no [DONE]
            content = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events[:2])
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})


def _engine(tiny_base: Path, worker: FakeWorker, **kwargs: Any) -> UpstreamEngine:
    return UpstreamEngine(
        "http://h200-0:8000", "/artifact/quantized", tokenizer=tiny_base, transport=httpx.MockTransport(worker), **kwargs
    )


async def _collect(engine: UpstreamEngine, adapter: str | None = None, **params: Any) -> list[Chunk]:
    await engine.start()
    try:
        return [c async for c in engine.generate("Hello", SamplingParams(max_tokens=4, **params), adapter=adapter)]
    finally:
        await engine.stop()


def test_is_an_engine_and_relays_chunks_with_the_workers_token_count(tiny_base: Path) -> None:
    worker = FakeWorker(["He", "llo", " wor", "ld"])
    engine = _engine(tiny_base, worker)
    assert isinstance(engine, Engine)
    chunks = asyncio.run(_collect(engine, temperature=0.0, stop=["\n"], seed=7))
    assert [c.text for c in chunks] == ["He", "llo", " wor", "ld", ""]
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == 4 and set(chunks[-1].token_ids) == {UNKNOWN_TOKEN_ID}
    (body,) = worker.bodies
    assert body["model"] == "/artifact/quantized" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["stop"], body["seed"]) == (4, 0.0, ["\n"], 7)
    assert "lora_request" not in body


def test_lora_adapter_travels_as_trtllm_lora_request(tiny_base: Path) -> None:
    worker = FakeWorker(["ok"])
    adapters = {"support": "/artifact/adapters/support", "billing": "/artifact/adapters/billing"}
    asyncio.run(_collect(_engine(tiny_base, worker, adapters=adapters), adapter="support"))
    asyncio.run(_collect(_engine(tiny_base, worker, adapters=adapters), adapter="billing"))
    first, second = (b["lora_request"] for b in worker.bodies)
    assert set(first) == DOCUMENTED_LORA_REQUEST
    assert first == {"lora_name": "support", "lora_int_id": 1, "lora_path": "/artifact/adapters/support"}
    assert second["lora_int_id"] == 0 and worker.bodies[0]["model"] == "/artifact/quantized"
    with pytest.raises(ModelNotFoundError, match="no adapter `nope`"):
        asyncio.run(_collect(_engine(tiny_base, worker, adapters=adapters), adapter="nope"))


def test_vllm_style_adapter_is_a_model_name(tiny_base: Path) -> None:
    worker = FakeWorker(["ok"])
    engine = _engine(tiny_base, worker, adapter_mode="model", adapter_model_template="{model}:{adapter}")
    asyncio.run(_collect(engine, adapter="support"))
    assert worker.bodies[0]["model"] == "/artifact/quantized:support" and "lora_request" not in worker.bodies[0]
    with pytest.raises(ModelNotFoundError):
        asyncio.run(_collect(_engine(tiny_base, worker, adapter_mode="none"), adapter="support"))


def test_worker_errors_keep_their_meaning(tiny_base: Path) -> None:
    bad = FakeWorker([], status=400, error={"message": "max_tokens too large", "param": "max_tokens", "code": "invalid_request"})
    with pytest.raises(ForgelineError, match="max_tokens too large") as err:
        asyncio.run(_collect(_engine(tiny_base, bad)))
    assert err.value.http_status == 400 and err.value.param == "max_tokens"
    down = FakeWorker([], status=503)
    with pytest.raises(ForgelineError, match="HTTP 503") as err:
        asyncio.run(_collect(_engine(tiny_base, down)))
    assert err.value.http_status == 503
    with pytest.raises(ForgelineError, match="ended before the completion finished") as err:
        asyncio.run(_collect(_engine(tiny_base, FakeWorker(["a", "b", "c"], truncate=True))))
    assert err.value.http_status == 503


def test_health_and_metrics_come_from_the_worker(tiny_base: Path) -> None:
    async def run() -> tuple[bool, str]:
        engine = _engine(tiny_base, FakeWorker([]))
        await engine.start()
        try:
            return engine.ready, await engine.scrape_metrics()
        finally:
            await engine.stop()

    ready, metrics = asyncio.run(run())
    assert ready and "gpuMemUsage" in metrics


def test_without_a_tokenizer_start_says_what_to_pass() -> None:
    engine = UpstreamEngine("http://h200-0:8000", "/not/here/checkpoint")
    with pytest.raises(ForgelineError, match="pass tokenizer="):
        asyncio.run(engine.start())
