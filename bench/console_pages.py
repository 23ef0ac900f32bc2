"""The approver's console: page load times for a model with 50 versions, on the embedded defaults.

Baseline in the same run: the JSON API call that lists the same model's versions
(``GET /v1/models/{name}/versions``), so the ratio shows what rendering, gates and charts add.

    python -m bench.console_pages [--setting smoke|full]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import main
from bench.stats import percentiles

VERSIONS = {"smoke": 5, "full": 50}
ROUNDS = {"smoke": 3, "full": 30}


def _populate(registry: Any, name: str, count: int) -> None:
    from registry import lineage

    experiment_id = registry.ensure_experiment("bench-console")
    for i in range(count):
        run_id = registry.client.create_run(experiment_id).info.run_id
        for step in range(1, 21):
            registry.client.log_metric(run_id, "loss", 3.0 / step, step=step)
        registry.client.set_terminated(run_id)
        version = registry.create_version(
            name,
            source=f"runs:/{run_id}/model",
            run_id=run_id,
            tags={lineage.BASE_MODEL: "tiny-base", lineage.METHOD: "sft", lineage.RUN_ID: run_id,
                  lineage.TRAINED_BY: "trainer", lineage.ORG: "acme"},
        )
        registry.record_evaluation(name, version.version, {"accuracy": 0.5 + i / (2 * count), "eval_loss": 1.0},
                                   base_metrics={"eval_loss": 2.0})


def run(setting: str, work: Path) -> dict[str, Any]:
    from forgeline.control import create_control_app
    from registry.client import Registry
    from registry.decisions import decide
    from registry.keys import KeyStore
    from registry.policy import PolicyBook
    from registry.promotion import promote
    from serving.gateway.server import serve_in_background

    registry = Registry()
    keys = KeyStore(registry.audit.url)
    policies = PolicyBook.model_validate({"default": {"thresholds": {"accuracy": {"min": 0.5}}, "approvals": {"count": 1}}})
    secret = keys.create("ana", roles=("approver",), org="acme")[0]
    name, count = "support", VERSIONS[setting]
    _populate(registry, name, count)
    decide(registry, name, 1, actor="ana", roles=("approver",), decision="approve", comment="ok")
    promote(registry, name, 1, policy=policies.for_model(name), actor="trainer", reason="bench")
    url, stop = serve_in_background(create_control_app(registry=registry, keys=keys, policies=policies, supervise=False))
    pages = {
        "api: versions (baseline)": f"/v1/models/{name}/versions",
        "console: inbox": "/console",
        "console: model": f"/console/models/{name}",
        "console: version": f"/console/models/{name}/versions/{count}",
        "console: history": f"/console/models/{name}/history",
    }
    results: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post("/console/login", data={"api_key": secret})
            headers = {"Authorization": f"Bearer {secret}"}
            for label, path in pages.items():
                client.get(path, headers=headers).raise_for_status()  # warm
                samples = []
                for _ in range(ROUNDS[setting]):
                    began = time.perf_counter()
                    client.get(path, headers=headers).raise_for_status()
                    samples.append((time.perf_counter() - began) * 1000)
                results[label] = percentiles(samples)
    finally:
        stop()
        registry.close()
        keys.dispose()
    baseline = results["api: versions (baseline)"]["p50"]
    return {
        "versions": count,
        "rounds": ROUNDS[setting],
        "latency_ms": results,
        "p50_vs_api": {label: r["p50"] / baseline for label, r in results.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main("console_pages", run))
