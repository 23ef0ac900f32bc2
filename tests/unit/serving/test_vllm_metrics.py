"""The gateway's metrics under vLLM's names, per-key labels opt-in, workers' gauges re-exported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.engine.base import Chunk
from serving.engine.upstream import UpstreamEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.metrics import VLLM_NAMES
from tests.unit.serving.test_gateway_app import CHAT, ScriptedEngine


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def _run(app: object, requests: int) -> str:
    async def main() -> str:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as client:  # type: ignore[attr-defined]
            for i in range(requests):
                answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": bool(i % 2)})
                assert answer.status_code == 200
            return (await client.get("/metrics")).text

    return asyncio.run(main())


def _engine() -> ScriptedEngine:
    return ScriptedEngine([Chunk(text="a", token_ids=[1]), Chunk(text="b", token_ids=[2, 3], finish_reason="stop")])


def test_vllm_names_mirror_ours_per_model_name_without_key_labels() -> None:
    served = [ServedModel(name="m", version="1", engine=_engine()), ServedModel(name="m@2", version="2", engine=_engine(), model="m")]
    samples = _samples(_run(create_app(StaticCatalog(served)), 4))
    ours = sum(v for (n, labels), v in samples.items() if n == "forgeline_generation_tokens_total")
    assert ours == 4 * 3
    assert samples[("vllm:generation_tokens_total", (("model_name", "m"),))] == ours
    assert samples[("vllm:prompt_tokens_total", (("model_name", "m"),))] == sum(
        v for (n, _), v in samples.items() if n == "forgeline_prompt_tokens_total"
    )
    assert samples[("vllm:request_success_total", (("model_name", "m"),))] == 4
    assert samples[("vllm:e2e_request_latency_seconds_count", (("model_name", "m"),))] == 4
    assert samples[("vllm:time_to_first_token_seconds_count", (("model_name", "m"),))] == 4
    assert samples[("vllm:e2e_request_latency_seconds_bucket", (("le", "+Inf"), ("model_name", "m")))] == 4
    assert ("vllm:num_requests_running", (("model_name", "m"),)) in samples
    # No `key` label unless asked for: one series per key multiplies every counter.
    assert not any("key" in dict(labels) for _, labels in samples)
    # Every vLLM name we document is exported.
    names = {n for n, _ in samples} | {n.removesuffix("_total") for n, _ in samples}
    assert all(any(n.startswith(v) for n in names) for v in VLLM_NAMES if "cache" not in v), names


def test_per_key_labels_are_opt_in() -> None:
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=_engine())]), metrics_per_key=True)
    samples = _samples(_run(app, 1))
    keyed = [dict(labels) for n, labels in samples if n == "forgeline_requests_total"]
    assert keyed and all("key" in labels for labels in keyed)


def test_the_workers_own_queue_kv_cache_and_batch_gauges_are_re_exported_per_worker(tiny_base: Path) -> None:
    reported = {"w0": (3, 0.25, 7), "w1": (1, 0.5, 2)}

    def worker(request: httpx.Request) -> httpx.Response:
        waiting, kv, running = reported[request.url.host]
        if request.url.path == "/metrics":
            return httpx.Response(200, text=(
                f'vllm:num_requests_waiting{{model_name="x"}} {waiting}\n'
                f'vllm:gpu_cache_usage_perc{{model_name="x"}} {kv}\n'
                f'vllm:num_requests_running{{model_name="x"}} {running}\n'
            ))  # fmt: skip
        return httpx.Response(200)

    engine = UpstreamEngine(["http://w0:8000", "http://w1:8000"], "x", tokenizer=tiny_base, scrape_queue=True,
                            transport=httpx.MockTransport(worker), model_id="pool")  # fmt: skip
    app = create_app(StaticCatalog([ServedModel(name="pool", version="1", engine=engine)]))
    samples = _samples(_run(app, 0))
    for host, (waiting, kv, running) in reported.items():
        url = f"http://{host}:8000"
        assert samples[("vllm:gpu_cache_usage_perc", (("model_name", "pool"), ("worker", url)))] == kv
        assert samples[("vllm:kv_cache_usage_perc", (("model_name", "pool"), ("worker", url)))] == kv
        labels = (("model", "pool"), ("version", "1"), ("worker", url))
        assert samples[("forgeline_upstream_worker_num_requests_waiting", labels)] == waiting
        assert samples[("forgeline_upstream_worker_batch_size", labels)] == running
    assert samples[("vllm:num_requests_waiting", (("model_name", "pool"),))] == 4


def test_observe_many_leaves_a_histogram_as_observing_one_by_one_does() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from serving.gateway.metrics import observe_many

    texts = []
    for batched in (False, True):
        registry = CollectorRegistry()
        child = Histogram("gap_seconds", "gaps", ["model"], buckets=(0.001, 0.01, 0.1), registry=registry).labels("m")
        for value, count in ((0.0, 3), (0.001, 2), (0.05, 1), (0.5, 4), (0.02, 0)):
            if batched:
                observe_many(child, value, count)
            else:
                for _ in range(count):
                    child.observe(value)
        samples = _samples(generate_latest(registry).decode())
        texts.append({key: value for key, value in samples.items() if not key[0].endswith("_created")})  # a time
    assert texts[0] == texts[1]
    assert texts[1][("gap_seconds_count", (("model", "m"),))] == 10
    assert texts[1][("gap_seconds_bucket", (("le", "0.001"), ("model", "m")))] == 5
