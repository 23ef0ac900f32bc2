"""The aiohttp client to workers against a real uvicorn worker: idle keep-alive connections."""

from __future__ import annotations

import asyncio

import pytest

from bench.fake_upstream import create_app as fake_worker
from serving.engine.worker_http import KEEPALIVE_S, AiohttpWorkerClient
from serving.gateway.server import serve_in_background

pytestmark = pytest.mark.integration


def test_requests_after_idle_gaps_around_the_workers_keep_alive_all_succeed() -> None:
    # uvicorn (vLLM, trtllm-serve, forgeline worker) closes an idle connection after 5 s; a
    # client that reused one it was closing would fail the request (and eject the worker).
    url, stop = serve_in_background(fake_worker(tokens=2))

    async def main() -> list[int]:
        client = AiohttpWorkerClient(headers={}, connect_timeout=5, read_timeout=30)
        statuses = []
        try:
            for gap in (0.0, KEEPALIVE_S + 0.5, 5.05, 0.1):
                await asyncio.sleep(gap)
                answer = await client.post_json(f"{url}/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2}, None, timeout=30)
                statuses.append(answer.status)
        finally:
            await client.aclose()
        return statuses

    try:
        assert asyncio.run(main()) == [200, 200, 200, 200]
    finally:
        stop()
