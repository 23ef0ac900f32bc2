"""A gateway config file: ``forgeline serve --config gateway.yaml``.

What an operator writes to run an endpoint, without a training recipe: the models (a
registry ref whose alias is followed, a built torch artifact folder, or a pool of
OpenAI-compatible workers), the worker pools (static URLs or a DNS name such as a
Kubernetes headless Service), request limits, the key store, quotas and telemetry. Every
problem is reported at once, each with its YAML path, the bad value and the fix, as the
recipe's are. An example with every section: ``platform/gateway.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.errors import ErrorCode, ForgelineError
from serving.config import CanarySpec, ServerLimits, ServeSpec
from serving.engine.base import DEFAULT_MAX_BATCH_SIZE, EngineDtype
from serving.engine.pool import PoolPolicy


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(_Section):
    """OpenAI-compatible workers (trtllm-serve, vLLM, SGLang, `forgeline worker`) serving one model."""

    urls: list[str] = Field(default_factory=list, description="Static workers, e.g. http://h200-0:8000 (no /v1).")
    dns: str | None = Field(default=None, description="A URL whose host resolves to every worker (a Kubernetes headless Service), re-resolved every `discovery_interval_s`.")
    discovery_interval_s: float = Field(default=10.0, gt=0)
    api: Literal["chat", "completions"] = Field(default="chat", description="`chat`: chat requests pass through whole (tools, JSON schema, logprobs, n); `completions`: the gateway renders the chat template.")
    health_interval_s: float = Field(default=2.0, gt=0, description="Seconds between each worker's /health checks.")
    scrape_metrics: bool = Field(default=True, description="Read each worker's vLLM queue / batch / KV-cache gauges with every health check: routing uses them and /metrics re-exports them.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the workers' API key, if they want one.")
    artifact_dir: str | None = Field(default=None, description="For registry refs: where the workers mount the version's TensorRT-LLM artifact (default: the same path as here).")
    policy: PoolPolicy = Field(default_factory=PoolPolicy, description="Ejection, slow-worker, affinity and retry settings.")

    @model_validator(mode="after")
    def _has_workers(self) -> PoolConfig:
        if not self.urls and not self.dns:
            raise ValueError("a pool needs its workers: `urls` (a list) or `dns` (a name resolving to all)")
        for url in self.urls:
            if not url.startswith(("http://", "https://")) or url.rstrip("/").endswith("/v1"):
                raise ValueError(f"worker URL {url!r} must be http(s)://host:port without /v1")
        return self


class ModelConfig(_Section):
    """One served model: exactly one of ``ref``, ``path`` or (``pool`` with ``upstream_model``)."""

    name: str = Field(min_length=1, description="The public name clients send as `model` (a registry model's name for `ref`).")
    ref: str | None = Field(default=None, description="A registry ref, e.g. support@production: the alias is followed (hot swap, canary).")
    path: str | None = Field(default=None, description="A built torch artifact folder (`forgeline build`), served as is.")
    pool: str | None = Field(default=None, description="A pool under `pools:`; with `ref`, the workers serve the version's TensorRT-LLM artifact.")
    upstream_model: str | None = Field(default=None, description="With `pool` and no `ref`: the model name the workers expect.")
    tokenizer: str | None = Field(default=None, description="With `pool` and no `ref`: the model's tokenizer folder or hub id (chat template, token counts).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        kinds = [k for k in ("ref", "path") if getattr(self, k)] + (["pool"] if self.pool and not self.ref else [])
        if len(kinds) != 1:
            raise ValueError("give exactly one of `ref` (registry), `path` (torch artifact) or `pool` (+ `upstream_model`, `tokenizer`)"
                             + (f"; got {', '.join(kinds)}" if kinds else ""))
        if kinds == ["pool"] and not (self.upstream_model and self.tokenizer):
            raise ValueError("a model served by a pool without `ref` needs `upstream_model` (the workers' model name) and `tokenizer`")
        if self.path and self.pool:
            raise ValueError("`path` is served here by the PyTorch engine; drop `pool`, or use `ref` for workers")
        return self


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description="Gateway processes sharing the port (quotas then need `quotas.redis_url`).")
    limits: ServerLimits = Field(default_factory=ServerLimits)


class RequestLimits(_Section):
    max_new_tokens: int = Field(default=256, gt=0, description="Default and upper bound for `max_tokens`.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)


class KeysConfig(_Section):
    enabled: bool = Field(default=True, description="Require `Authorization: Bearer <key>` (`forgeline keys create`).")
    db_url: str | None = Field(default=None, description="The control database holding the keys (default: FORGELINE_DB_URL, else $FORGELINE_HOME/control.db).")
    cache_s: float = Field(default=2.0, ge=0, description="Seconds a verified key is trusted (revocation delay).")


class QuotasConfig(_Section):
    redis_url: str | None = Field(default=None, description="Share rpm/tpm buckets between processes and replicas (default: FORGELINE_REDIS_URL, else in-process).")


class TelemetryConfig(_Section):
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces endpoint; default: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; none: tracing off.")
    service_name: str = "forgeline-gateway"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    metrics_per_key: bool = Field(default=False, description="Label request and token counters with the key id (one series per key).")


class RolloutConfig(_Section):
    poll_interval_s: float = Field(default=10.0, ge=0)
    watch_interval_s: float = Field(default=0.5, ge=0)
    drain_timeout_s: float = Field(default=120.0, gt=0)
    canary: CanarySpec | None = None
    device: str = Field(default="auto", description="Torch device for models served here: auto, cpu, cuda, cuda:N.")
    dtype: EngineDtype = Field(default="auto", description="Weights' dtype for the PyTorch engine: auto (float32 on CPUs, the artifact's own on GPUs), float32, bfloat16 (about 2x faster decoding on CPUs with AMX or AVX-512 BF16), float16.")
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, gt=0)


class GatewayConfig(_Section):
    """``forgeline serve --config``: everything one gateway serves and how."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelConfig] = Field(min_length=1)
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    quotas: QuotasConfig = Field(default_factory=QuotasConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        problems: list[str] = []
        names = [m.name for m in self.models]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"models: `{dup}` is named twice; public names must be unique")
        for i, model in enumerate(self.models):
            if model.pool and model.pool not in self.pools:
                known = ", ".join(sorted(self.pools)) or "none are defined"
                problems.append(f"models.{i}.pool: `{model.pool}` is not under `pools:` ({known})")
        ref_pools = {m.pool for m in self.models if m.ref}
        if len(ref_pools) > 1:
            problems.append(
                "models: registry refs share one engine setting; they name different pools "
                f"({', '.join(sorted(str(p) for p in ref_pools))}): serve them from one pool, or all here (no `pool`)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def serve_spec(self) -> ServeSpec:
        """The `ServeSpec` for the registry refs (and the server): what a recipe's ``serve`` section says."""
        pool_name = next((m.pool for m in self.models if m.ref and m.pool), None)
        upstream: dict[str, Any] = {}
        if pool_name is not None:
            pool = self.pools[pool_name]
            upstream = {
                "engine": "upstream",
                "upstream_urls": pool.urls,
                "upstream_dns": pool.dns,
                "upstream_discovery_interval_s": pool.discovery_interval_s,
                "upstream_health_interval_s": pool.health_interval_s,
                "upstream_api": pool.api,
                "upstream_pool": pool.policy,
                "upstream_scrape_queue": pool.scrape_metrics,
                "upstream_artifact_dir": pool.artifact_dir,
            }
        return ServeSpec(
            host=self.server.host,
            port=self.server.port,
            limits=self.server.limits,
            max_new_tokens=self.limits.max_new_tokens,
            max_body_bytes=self.limits.max_body_bytes,
            auth=self.keys.enabled,
            key_cache_s=self.keys.cache_s,
            redis_url=self.quotas.redis_url,
            poll_interval_s=self.rollout.poll_interval_s,
            watch_interval_s=self.rollout.watch_interval_s,
            drain_timeout_s=self.rollout.drain_timeout_s,
            canary=self.rollout.canary,
            device=self.rollout.device,
            dtype=self.rollout.dtype,
            max_batch_size=self.rollout.max_batch_size,
            **upstream,
        )


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and check a gateway config file.

    Raises:
        ForgelineError: ``invalid_config``: the file is missing or not YAML, or any field is
            wrong; the message lists every problem with its YAML path and value.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ForgelineError(f"cannot read gateway config {path}: {exc.strerror or exc}", code=ErrorCode.INVALID_CONFIG, param="config") from exc
    except yaml.YAMLError as exc:
        raise ForgelineError(f"gateway config {path} is not valid YAML: {exc}", code=ErrorCode.INVALID_CONFIG, param="config") from exc
    if not isinstance(raw, dict):
        raise ForgelineError(f"gateway config {path} must be a mapping with `models:`; see platform/gateway.yaml",
                             code=ErrorCode.INVALID_CONFIG, param="config")  # fmt: skip
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ForgelineError(_describe(path, exc), code=ErrorCode.INVALID_CONFIG, param="config") from None


def _describe(path: Path, exc: ValidationError) -> str:
    lines = [f"gateway config {path} has {exc.error_count()} problem(s):"]
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field; remove it or check the spelling (see platform/gateway.yaml)"
        value = error.get("input")
        shown = "" if error["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  - {where}: {message}{shown}")
    return "\n".join(lines)


def build_from_config(config: GatewayConfig) -> FastAPI:
    """The gateway app for ``config`` (models load in its lifespan)."""
    from registry.keys import KeyStore
    from serving import telemetry
    from serving.gateway.catalog import ModelCatalog, StaticCatalog
    from serving.registry_catalog import RegistryCatalog
    from serving.service import gateway_app

    t = config.telemetry
    telemetry.configure_tracing(endpoint=t.otlp_endpoint, service_name=t.service_name, sample_ratio=t.sample_ratio)
    spec = config.serve_spec()
    static = [_static_model(i, m, config, spec) for i, m in enumerate(config.models) if not m.ref]
    refs = [m.ref for m in config.models if m.ref]
    catalog: ModelCatalog
    if refs:
        from registry.client import Registry

        catalog = RegistryCatalog(Registry(), refs, spec=spec, bases=static)
    else:
        catalog = StaticCatalog(static)
    keys = KeyStore(config.keys.db_url) if config.keys.enabled else None
    return gateway_app(catalog, spec, keys, metrics_per_key=t.metrics_per_key)


def _static_model(index: int, model: ModelConfig, config: GatewayConfig, spec: ServeSpec) -> Any:
    from serving.engine.base import SamplingDefaults
    from serving.gateway.catalog import ServedModel

    if model.path is not None:
        from serving.artifacts.torch_build import load_manifest
        from serving.engine.torch_engine import TorchEngine

        folder = Path(model.path).expanduser()
        try:
            load_manifest(folder)  # checksums, before any weights load
        except ForgelineError as exc:
            raise ForgelineError(f"models.{index}.path: {exc.message}", code=exc.code, param="path") from exc
        engine = TorchEngine(folder, device=spec.device, dtype=spec.dtype, max_batch_size=spec.max_batch_size, model_id=model.name)
        return ServedModel(name=model.name, version="local", engine=engine, artifact=str(folder),
                           sampling_defaults=SamplingDefaults.from_model_dir(folder))  # fmt: skip
    from serving.engine.discovery import DnsDiscovery
    from serving.engine.upstream import UpstreamEngine

    assert model.pool is not None and model.upstream_model is not None
    pool = config.pools[model.pool]
    engine = UpstreamEngine(
        pool.urls,
        model.upstream_model,
        api_key=os.environ.get(pool.api_key_env) if pool.api_key_env else None,
        tokenizer=model.tokenizer,
        adapter_mode="none",
        model_id=model.name,
        health_interval=pool.health_interval_s,
        upstream_api=pool.api,
        discovery=DnsDiscovery(pool.dns) if pool.dns else None,
        discovery_interval=pool.discovery_interval_s,
        policy=pool.policy,
        scrape_queue=pool.scrape_metrics,
    )
    tokenizer_dir = Path(model.tokenizer or "")
    defaults = SamplingDefaults.from_model_dir(tokenizer_dir) if tokenizer_dir.is_dir() else SamplingDefaults()
    return ServedModel(name=model.name, version=model.pool, engine=engine, artifact=f"pool:{model.pool}",
                       chat_relay=engine.chat_relay, sampling_defaults=defaults)  # fmt: skip
