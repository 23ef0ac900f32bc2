"""A bounded load test on loopback: 200 concurrent streaming clients, no errors, every stream ends with [DONE]."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from registry.keys import KeyStore
from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background

pytestmark = pytest.mark.integration

CLIENTS = 200
DEADLINE_S = 240  # the test stops itself; 200 streams took 8 s on 2 busy cores


@pytest.fixture(scope="module")
def loaded_gateway(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    keys = KeyStore(f"sqlite:///{tmp_path_factory.mktemp('load-keys') / 'control.db'}")
    engine = TorchEngine(tiny_artifact, device="cpu", model_id="tiny", max_batch_size=32, batch_window_ms=10)
    app = create_app(StaticCatalog([ServedModel(name="tiny", version="1", engine=engine)]), max_new_tokens=16, keys=keys)
    base_url, stop = serve_in_background(app)
    secret, _ = keys.create("load")
    try:
        yield base_url, secret
    finally:
        stop()
        keys.dispose()


async def _stream(client: httpx.AsyncClient, i: int) -> tuple[bool, int, str]:
    """(ended with [DONE], content chunks, error text) for one streaming chat."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Client {i} says hello"}],
        "max_tokens": 6,
        "stream": True,
    }
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return False, 0, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        last = ""
        async for line in response.aiter_lines():
            if not line:
                continue
            last = line
            if line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return False, chunks, str(event["error"])
                chunks += 1
    return last == "data: [DONE]", chunks, ""


def test_200_concurrent_streams_all_finish_with_done(loaded_gateway: tuple[str, str]) -> None:
    base_url, key = loaded_gateway

    async def run() -> list[tuple[bool, int, str] | BaseException]:
        limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers, timeout=DEADLINE_S) as client:
            tasks = [_stream(client, i) for i in range(CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)

    started = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - started
    failures = [r for r in results if isinstance(r, BaseException) or not r[0]]
    assert not failures, f"{len(failures)} of {CLIENTS} streams failed, e.g. {failures[:3]}"
    assert all(r[1] >= 2 for r in results if not isinstance(r, BaseException))  # role chunk + content
    from prometheus_client.parser import text_string_to_metric_families

    served = sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        for sample in family.samples
        if sample.name == "forgeline_requests_total" and sample.labels.get("status") == "200"
    )
    assert served == CLIENTS
    print(f"{CLIENTS} concurrent streams in {elapsed:.1f} s")
