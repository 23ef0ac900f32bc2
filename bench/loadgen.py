"""Closed-loop load with the stock ``openai`` async client: N workers, each one request at a time.

Every target (direct, forgeline, LiteLLM) is driven by this same code, so the client's own
cost is the same in every measurement. Latency is measured around the SDK call: from just
before ``create`` to the last chunk (streaming) or the parsed response; time to first
token is the first chunk that carries content.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.stats import percentiles

logger = logging.getLogger(__name__)

MESSAGES = [{"role": "user", "content": "Route this ticket: my parcel never arrived"}]


@dataclass
class LoadResult:
    """What one closed-loop run measured."""

    concurrency: int
    stream: bool
    requests: int
    errors: int
    wall_s: float
    e2e_ms: dict[str, float | None]
    ttft_ms: dict[str, float | None]
    requests_per_s: float
    tokens_per_s: float
    first_error: str | None = None
    warmup_requests: int = 0
    samples_e2e_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, keep_samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not keep_samples:
            data.pop("samples_e2e_ms")
        return data


async def _one(client: Any, model: str, *, stream: bool, max_tokens: int) -> tuple[float, float | None, int]:
    """(e2e seconds, ttft seconds or None, completion tokens) of one request."""
    began = time.perf_counter()
    if not stream:
        reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
        elapsed = time.perf_counter() - began
        tokens = reply.usage.completion_tokens if reply.usage else 0
        return elapsed, None, tokens
    ttft: float | None = None
    tokens = 0
    chunks = 0
    response = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in response:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - began
    return time.perf_counter() - began, ttft, tokens or chunks


async def run_load(
    base_url: str,
    *,
    model: str,
    api_key: str = "none",
    concurrency: int,
    requests: int,
    stream: bool,
    max_tokens: int = 16,
    warmup: int | None = None,
    time_limit_s: float = 30.0,
    request_timeout_s: float = 30.0,
) -> LoadResult:
    """Send ``requests`` chat completions from ``concurrency`` workers (after a warm-up).

    Stops early when ``time_limit_s`` passes (requests in flight finish first), so a slow
    target bounds the run instead of the run waiting on it.
    """
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    http = httpx.AsyncClient(limits=limits, timeout=request_timeout_s)
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, http_client=http)
    e2e: list[float] = []
    ttft: list[float] = []
    tokens = 0
    errors = 0
    first_error: str | None = None
    try:
        # Warm-up: open every connection and let each server reach steady state.
        warm = concurrency if warmup is None else warmup
        if warm:
            await asyncio.gather(
                *(_one(client, model, stream=stream, max_tokens=max_tokens) for _ in range(warm)), return_exceptions=True
            )
        remaining = requests
        deadline = time.perf_counter() + time_limit_s

        async def worker() -> None:
            nonlocal remaining, tokens, errors, first_error
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                try:
                    elapsed, first, n = await _one(client, model, stream=stream, max_tokens=max_tokens)
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                    continue
                e2e.append(elapsed)
                if first is not None:
                    ttft.append(first)
                tokens += n

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    finally:
        await client.close()
        await http.aclose()
    done = len(e2e)
    return LoadResult(
        concurrency=concurrency,
        stream=stream,
        requests=done,
        errors=errors,
        wall_s=wall,
        e2e_ms=percentiles([x * 1000 for x in e2e]),
        ttft_ms=percentiles([x * 1000 for x in ttft]),
        requests_per_s=done / wall if wall > 0 else 0.0,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        first_error=first_error,
        warmup_requests=warm,
        samples_e2e_ms=[x * 1000 for x in e2e],
    )
