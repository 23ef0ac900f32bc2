"""The gateway's per-request metrics, counted through children kept per label values."""

from __future__ import annotations

from serving.gateway.metrics import GatewayMetrics


def test_kept_children_are_the_metrics_own_and_count_into_the_exported_series() -> None:
    metrics = GatewayMetrics()
    labels = ("tiny", "3", "")
    metrics.count(labels, "key-1", 200, prompt_tokens=5, completion_tokens=7, tokens=True)
    metrics.count(labels, "key-1", 200, prompt_tokens=1, completion_tokens=2, tokens=True)
    metrics.count(labels, "key-1", 429, prompt_tokens=0, completion_tokens=0, tokens=False)
    assert metrics.requests_by[(*labels, 200)] is metrics.requests.labels(*labels, "200")
    value = metrics.registry.get_sample_value
    by = {"model": "tiny", "version": "3", "adapter": ""}
    assert value("forgeline_requests_total", {**by, "status": "200"}) == 2
    assert value("forgeline_requests_total", {**by, "status": "429"}) == 1
    assert value("forgeline_prompt_tokens_total", by) == 6
    assert value("forgeline_generation_tokens_total", by) == 9
    metrics.e2e_by[labels].observe(0.2)
    assert value("forgeline_e2e_request_latency_seconds_count", by) == 1
