"""The ``serve`` section of a recipe, also used by ``forgeline serve``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.engine.base import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE, EngineDtype
from serving.engine.pool import PoolPolicy


class CanarySLO(BaseModel):
    """When a canary counts as failing; every limit that is set must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(default=0.05, ge=0, le=1, description="Highest share of canary requests that may fail (5xx).")
    p95_latency_ms: float | None = Field(default=None, gt=0, description="Highest p95 end-to-end latency of canary requests, in ms.")
    window: float = Field(default=60.0, gt=0, description="Seconds of recent canary requests the SLO is judged on.")
    min_requests: int = Field(default=10, gt=0, description="Canary requests the window must hold before it is judged.")


class CanarySpec(BaseModel):
    """Send a share of a model's traffic to the version another alias points to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field(default="staging", min_length=1, description="Alias holding the candidate, e.g. `staging`.")
    percent: float = Field(default=10.0, gt=0, le=100, description="Share of the model's requests sent to the candidate.")
    slo: CanarySLO = Field(default_factory=CanarySLO, description="Breaching it sends all traffic back to `production`.")


class ServerLimits(BaseModel):
    """Limits of the HTTP server in front of an app (``forgeline serve`` / ``control serve`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header_timeout_s: float = Field(
        default=10.0, gt=0, description="A request's headers must arrive within this many seconds of its first byte "
        "(or of the connection opening); otherwise the connection is closed (408)."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest pause between two pieces of a request body before the connection is closed."
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="An idle keep-alive connection is closed after this many seconds.")
    max_connections: int = Field(
        default=1024, gt=0, description="Open connections beyond this are closed at once; requests beyond it get 503."
    )
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="Largest request line plus headers (larger: 431 and the connection is closed).")
    graceful_shutdown_s: float = Field(
        default=30.0, gt=0, description="On SIGTERM: finish running requests and streams for at most this long, then stop."
    )


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["torch", "upstream"] = Field(
        default="torch",
        description="`torch`: the portable PyTorch engine; `upstream`: the version's tensorrt-llm artifact served by a worker at `upstream_url`.",
    )
    upstream_url: str | None = Field(default=None, description="`engine: upstream`: one OpenAI-compatible worker, e.g. http://h200-0:8000 (a pool of one).")
    upstream_urls: list[str] = Field(
        default_factory=list, description="`engine: upstream`: a static pool of workers serving the same artifact (with `upstream_url`, if set)."
    )
    upstream_dns: str | None = Field(
        default=None,
        description="`engine: upstream`: a URL whose host name resolves to every worker (a Kubernetes headless service), re-resolved every `upstream_discovery_interval_s`.",
    )
    upstream_discovery_interval_s: float = Field(default=10.0, gt=0, description="How often `upstream_dns` is resolved again.")
    upstream_health_interval_s: float = Field(default=2.0, gt=0, description="How often each worker's `/health` is polled.")
    upstream_api: Literal["completions", "chat"] = Field(
        default="completions",
        description="`chat`: chat requests pass through whole to the workers' /v1/chat/completions (tools, JSON schema, logprobs, n); "
        "`completions`: the gateway renders the chat template and calls /v1/completions.",
    )
    upstream_pool: PoolPolicy = Field(
        default_factory=PoolPolicy, description="`engine: upstream`: ejection, slow-worker, affinity and retry settings of the pool."
    )
    upstream_scrape_queue: bool = Field(
        default=False, description="Route by the workers' own queue depth (vLLM's `vllm:num_requests_waiting` on /metrics)."
    )
    upstream_artifact_dir: str | None = Field(
        default=None, description="`engine: upstream`: where the worker mounts the artifact (default: the same path as here)."
    )
    host: str = Field(default="127.0.0.1", description="Interface the gateway listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the gateway listens on (0 picks a free one).")
    max_batch_size: int = Field(
        default=DEFAULT_MAX_BATCH_SIZE, gt=0, description="Most requests decoded together by the PyTorch engine."
    )
    batch_window_ms: float = Field(
        default=DEFAULT_BATCH_WINDOW_MS,
        ge=0,
        description="How long an idle engine waits to gather requests into one prefill (0: none; later arrivals join at the next step).",
    )
    prefill_chunk: int = Field(default=256, gt=0, description="Most prompt tokens the PyTorch engine prefills between two decode steps.")
    prefix_cache_tokens: int = Field(default=0, ge=0, description="Prompt-prefix KV the PyTorch engine keeps for reuse, in tokens (0: off).")
    max_new_tokens: int = Field(default=256, gt=0, description="Default and upper bound for `max_tokens` per request.")
    device: str = Field(default="auto", description="Torch device for the engine: auto, cpu, cuda, cuda:N.")
    dtype: EngineDtype = Field(default="auto", description="Weights' dtype for the PyTorch engine: auto (float32 on CPUs, the artifact's own on GPUs), float32, bfloat16 (about 2x faster decoding on CPUs with AMX or AVX-512 BF16), float16.")
    auth: bool = Field(default=True, description="Require `Authorization: Bearer <key>` (keys from `forgeline keys create`).")
    key_cache_s: float = Field(default=2.0, ge=0, description="Seconds a verified key is trusted before it is checked again (revocation delay).")
    redis_url: str | None = Field(default=None, description="Share quotas between replicas through this Redis (default: FORGELINE_REDIS_URL, else in-process).")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters served as `model:name`: name -> PEFT folder.")
    max_loaded_adapters: int = Field(default=8, gt=0, description="Adapters kept loaded per engine; the least recently used is unloaded.")
    poll_interval_s: float = Field(default=10.0, ge=0, description="How often aliases are re-read for hot swaps and canaries (0: never).")
    watch_interval_s: float = Field(default=0.5, ge=0, description="How often the audit log is asked whether any alias moved; a move re-reads aliases at once (0: only `poll_interval_s`).")
    drain_timeout_s: float = Field(default=120.0, gt=0, description="How long a replaced version may finish its requests before it is unloaded.")
    canary: CanarySpec | None = Field(default=None, description="Canary rollout with automatic return to `production` on SLO breach.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="Largest request body accepted (larger gets 413).")
    limits: ServerLimits = Field(default_factory=ServerLimits, description="HTTP server limits: timeouts, connection cap, graceful shutdown.")

    @model_validator(mode="after")
    def _upstream_needs_url(self) -> ServeSpec:
        if self.engine == "upstream" and not (self.upstream_url or self.upstream_urls or self.upstream_dns):
            raise ValueError(
                "`engine: upstream` needs its workers: `upstream_url` (one), `upstream_urls` (a list) or `upstream_dns` (a name resolving to all)"
            )
        return self

    @property
    def worker_urls(self) -> list[str]:
        """The static pool: `upstream_url` followed by `upstream_urls`, without repeats."""
        return list(dict.fromkeys([*([self.upstream_url] if self.upstream_url else []), *self.upstream_urls]))
