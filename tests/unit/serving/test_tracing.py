"""OpenTelemetry traces: one streamed request through the gateway to a (traced) fake worker.

The gateway and the worker each have their own tracer provider, exporting to one
in-memory exporter; the worker joins the trace only through the ``traceparent`` header the
gateway sends it, as it would across processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.fake_upstream import create_app as fake_worker
from registry.keys import KeyStore
from serving import telemetry
from serving.engine.upstream import UpstreamEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    assert telemetry.configure_tracing(exporter=spans, service_name="gateway-under-test")
    try:
        yield spans
    finally:
        telemetry.shutdown_tracing()


@pytest.mark.integration
@pytest.mark.parametrize("upstream_api", ["chat", "completions"])
def test_a_streamed_request_is_one_trace_across_gateway_and_worker(
    tiny_base: Path, exporter: InMemorySpanExporter, upstream_api: str
) -> None:
    worker_provider = TracerProvider(resource=Resource.create({"service.name": "fake-worker"}))
    worker_provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker_url, stop_worker = serve_in_background(fake_worker(tokens=4, name="worker", tracer=worker_provider.get_tracer("w")))
    engine = UpstreamEngine(worker_url, "fake", tokenizer=tiny_base, adapter_mode="none", upstream_api=upstream_api, model_id="m")  # type: ignore[arg-type]
    served = ServedModel(name="m", version="1", engine=engine, chat_relay=engine.chat_relay)
    keys = KeyStore()
    secret, _ = keys.create("tracing", roles=("user",), rpm=100)
    gateway_url, stop_gateway = serve_in_background(create_app(StaticCatalog([served]), keys=keys))
    try:
        client = openai.OpenAI(
            base_url=f"{gateway_url}/v1", api_key=secret, default_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        stop_gateway()
        stop_worker()
    assert text.strip()
    spans = exporter.get_finished_spans()
    by_name: dict[str, ReadableSpan] = {s.name: s for s in spans}
    root = by_name["POST /v1/chat/completions"]
    upstream, worker = by_name["upstream"], by_name[f"worker /v1/{'chat/completions' if upstream_api == 'chat' else 'completions'}"]
    for name in ("gateway.auth", "gateway.quota", "gateway.queue", "upstream"):
        assert by_name[name].parent is not None and by_name[name].parent.span_id == root.context.span_id, name
    # One trace: the client's, continued by the gateway, then by the worker through the traceparent we sent.
    assert {format(s.context.trace_id, "032x") for s in spans} == {CLIENT_TRACE}
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    assert worker.parent is not None and worker.parent.span_id == upstream.context.span_id
    assert worker.resource.attributes["service.name"] == "fake-worker"
    assert root.resource.attributes["service.name"] == "gateway-under-test"
    assert "first_token" in [e.name for e in root.events] and "first_token" in [e.name for e in upstream.events]
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["completion_tokens"] == 4
    assert upstream.attributes["server.address"] == worker_url
    worker_provider.shutdown()


def test_tracing_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*telemetry.ENDPOINT_ENVS, "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not telemetry.configure_tracing()
    assert not telemetry.enabled()
    with telemetry.span("nothing") as current:
        assert current is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.configure_tracing()
