"""`GatewayApp`: once started, HTTP requests skip FastAPI's no-op layers, and only those.

FastAPI's native telemetry is decided once, at start-up: off by default (no global
OpenTelemetry provider configured: no provider lookups per request), on when an operator
configured one (FastAPI's spans reach it, as before). A bug still gets the same logged,
OpenAI-shaped 500 through the shortened path as through FastAPI's whole one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.engine.base import Chunk, SamplingParams
from serving.gateway import fast_chat
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.gateway_app import GatewayApp
from tests.support.engines import StubEngine

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class _Engine(StubEngine):
    async def generate(
        self, prompt: str, params: SamplingParams, *, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        yield Chunk(text="hello", token_ids=[1], finish_reason="stop")


def _app() -> GatewayApp:
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=_Engine())]))
    assert isinstance(app, GatewayApp)
    return app


def test_without_an_operators_provider_no_lookups_are_made_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    original = trace.get_tracer_provider

    def counted() -> Any:
        lookups.append("tracer provider")
        return original()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    app = _app()
    with TestClient(app) as client:
        assert app.skip_noop_layers()  # what the lifespan decided at start-up
        lookups.clear()
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/v1/models").status_code == 200
        assert client.get("/health").status_code == 200
    assert lookups == []


def test_an_operators_global_provider_still_receives_fastapis_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    # As `trace.set_tracer_provider(provider)` would, without fixing it for the whole test session.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    app = _app()
    with TestClient(app) as client:
        assert not app.skip_noop_layers()
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/v1/models").status_code == 200
    fastapi_spans = [
        s for s in spans.get_finished_spans() if s.instrumentation_scope and s.instrumentation_scope.name == "fastapi"
    ]
    paths = {(s.attributes or {}).get("url.path") for s in fastapi_spans}
    assert {"/v1/chat/completions", "/v1/models"} <= paths


def test_a_bug_is_the_same_logged_500_on_either_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(fast_chat, "get_principal", broken)
    app = _app()
    seen: dict[bool, tuple[Any, ...]] = {}
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.INFO):
        shortened = app._entry
        assert shortened is not None
        for skip in (True, False):
            app._entry = shortened if skip else None  # None: FastAPI's whole path, as before
            caplog.clear()
            response = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "bug-1"})
            access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forgeline.access"]
            bugs = [r.exc_text for r in caplog.records if r.name == "serving.gateway.errors"]
            seen[skip] = (
                response.status_code,
                {k: v for k, v in response.headers.items() if k != "date"},
                response.json(),
                [{k: v for k, v in a.items() if k not in ("ts", "duration_ms")} for a in access],
                len(bugs) == 1 and "boom" in (bugs[0] or ""),
            )
    assert seen[True] == seen[False]
    status, _, body, access, logged = seen[True]
    assert status == 500 and body["error"]["code"] == "internal_error" and "boom" not in body["error"]["message"]
    assert logged and [a["request_id"] for a in access] == ["bug-1"]
