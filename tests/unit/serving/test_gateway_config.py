"""``forgeline serve --config``: the gateway config file, its errors, and a gateway built from it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import yaml

from bench.fake_upstream import create_app as fake_worker
from forgeline.gateway_config import GatewayConfig, build_from_config, load_gateway_config
from registry.errors import ForgelineError
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background

REPO = Path(__file__).resolve().parents[3]


def test_the_shipped_example_and_the_kubernetes_configmap_validate() -> None:
    example = load_gateway_config(REPO / "platform" / "gateway.yaml")
    assert [m.ref for m in example.models] == ["quickstart@production"] and example.serve_spec().engine == "torch"
    docs = list(yaml.safe_load_all((REPO / "platform" / "kubernetes" / "gateway.yaml").read_text()))
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    config = GatewayConfig.model_validate(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    spec = config.serve_spec()
    assert spec.engine == "upstream" and spec.upstream_dns == "http://trtllm-quickstart:8000" and spec.upstream_artifact_dir == "/artifact"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--config", "/etc/forgeline/gateway.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/forgeline"


def test_every_problem_is_named_by_its_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"port": 70000},
        "models": [
            {"name": "a", "ref": "a@production", "path": "/models/a"},
            {"name": "b", "pool": "nope", "upstream_model": "b", "tokenizer": "/t"},
            {"name": "c", "pool": "p"},
        ],
        "pools": {"p": {"urls": ["http://w0:8000/v1"]}},
        "keys": {"enabld": False},
    }))  # fmt: skip
    with pytest.raises(ForgelineError) as caught:
        load_gateway_config(path)
    message = caught.value.message
    assert "server.port" in message and "70000" in message
    assert "models.0: give exactly one of `ref`" in message and "got ref, path" in message
    assert "models.2: a model served by a pool without `ref` needs `upstream_model`" in message
    assert "pools.p: worker URL 'http://w0:8000/v1' must be http(s)://host:port without /v1" in message
    assert "keys.enabld: unknown field" in message
    # References between sections are checked once each section is valid.
    path.write_text(yaml.safe_dump({"models": [{"name": "b", "pool": "nope", "upstream_model": "b", "tokenizer": "/t"}]}))
    with pytest.raises(ForgelineError, match=r"models.0.pool: `nope` is not under `pools:` \(none are defined\)"):
        load_gateway_config(path)
    path.write_text("models: [")
    with pytest.raises(ForgelineError, match="not valid YAML"):
        load_gateway_config(path)


@pytest.mark.integration
def test_a_gateway_from_a_config_file_serves_a_pool_and_a_torch_artifact_to_the_sdk(
    tmp_path: Path, tiny_base: Path, tiny_artifact: Path
) -> None:
    worker_url, stop_worker = serve_in_background(fake_worker(tokens=3, name="w0"))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "models": [
            {"name": "workers", "pool": "local", "upstream_model": "fake", "tokenizer": str(tiny_base)},
            {"name": "tiny", "path": str(tiny_artifact)},
        ],
        "pools": {"local": {"urls": [worker_url], "api": "chat", "health_interval_s": 0.5}},
        "limits": {"max_new_tokens": 8},
        "keys": {"enabled": True, "cache_s": 0},
        "rollout": {"device": "cpu"},
        "telemetry": {"metrics_per_key": True},
    }))  # fmt: skip
    secret, _ = KeyStore().create("config-test", roles=("user",), rpm=50)
    gateway_url, stop_gateway = serve_in_background(build_from_config(load_gateway_config(path)))
    try:
        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=secret)
        assert sorted(m.id for m in client.models.list()) == ["tiny", "workers"]
        relayed = client.chat.completions.create(model="workers", messages=[{"role": "user", "content": "hi"}])
        assert relayed.choices[0].message.content == " tok" * 3 and relayed.usage is not None
        local = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert local.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=9)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-wrong").models.list()
        raw = client.with_raw_response.chat.completions.create(model="workers", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-ratelimit-limit-requests"] == "50"
        metrics = openai.OpenAI(base_url=gateway_url, api_key=secret).get("/metrics", cast_to=str)  # type: ignore[arg-type]
        assert 'vllm:request_success_total{model_name="workers"}' in metrics and 'key="' in metrics
    finally:
        stop_gateway()
        stop_worker()


def test_several_processes_with_keys_need_shared_quotas(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.serve_app import check_processes
    from serving.config import ServeSpec

    monkeypatch.delenv("FORGELINE_REDIS_URL", raising=False)
    check_processes(ServeSpec(), 1)
    check_processes(ServeSpec(auth=False), 4)
    check_processes(ServeSpec(redis_url="redis://127.0.0.1:6379/0"), 4)
    with pytest.raises(ForgelineError, match="--workers 4 with API keys needs quotas shared") as caught:
        check_processes(ServeSpec(), 4)
    assert caught.value.param == "workers"
