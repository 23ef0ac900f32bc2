"""Prometheus metrics (``GET /metrics``) and the structured access log.

Two sets of names. ``forgeline_*`` series carry the gateway's full labels (model, version,
adapter, status). The same measurements are also exported under vLLM's names with its
``model_name`` label (`VLLM_NAMES`), so dashboards, autoscalers (KEDA, HPA on custom
metrics) and routers built for vLLM read a forgeline endpoint as they read vLLM; those are
derived from ours at scrape time, so they cost nothing per request. Per-key labels are
opt-in (``per_key``): a ``key`` label multiplies every counter's series by the keys in use.

Each app has its own registry, so several gateways in one process (tests) do not collide.
The access log is one JSON object per request on the ``forgeline.access`` logger; it never
contains prompts or completions.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import request_id as request_ids
from serving import telemetry
from serving.engine.upstream import UpstreamEngine
from serving.gateway.catalog import ModelCatalog, ServedModel
from serving.gateway.errors import error_body, too_large_message

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("forgeline.access")

router = APIRouter()

# Latency buckets from vLLM's defaults, trimmed to what a gateway sees.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess mode: set before it is imported, in every process."""

Families = Callable[[Any], Iterable[Metric]]
"""A metric -> its families (this process's own, or summed over processes)."""


class _EngineCollector(Collector):
    """Queue depth, running requests and loaded adapters, read from the engines at scrape time."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterable[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "forgeline_num_requests_waiting", "Requests queued in the engine (queue depth).", labels=["model", "version"]
        )
        running = GaugeMetricFamily(
            "forgeline_num_requests_running", "Requests in the engine's running batch.", labels=["model", "version"]
        )
        adapters = GaugeMetricFamily(
            "forgeline_loaded_adapters", "LoRA adapters loaded in the engine.", labels=["model", "version"]
        )
        inflight = GaugeMetricFamily(
            "forgeline_requests_in_flight", "Requests the gateway is serving, per model version.", labels=["model", "version"]
        )
        seen: set[int] = set()
        for served in self._models():
            labels = [served.model, served.version]
            inflight.add_metric(labels, served.inflight)
            if id(served.engine) in seen:
                continue
            seen.add(id(served.engine))
            snapshot = served.engine.stats()
            if snapshot is None:  # an upstream pool: _PoolCollector reports its workers
                continue
            waiting.add_metric(labels, snapshot.waiting)
            running.add_metric(labels, snapshot.running)
            adapters.add_metric(labels, len(snapshot.loaded_adapters))
        yield from (waiting, running, adapters, inflight)


class _PoolCollector(Collector):
    """Each upstream worker's state, as its pool sees it, read at scrape time."""

    def __init__(self, models: Callable[[], Iterable[ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model", "version", "worker"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "outstanding": GaugeMetricFamily("forgeline_upstream_worker_requests_running", "Requests this gateway has in flight on the worker.", labels=labels),
            "healthy": GaugeMetricFamily("forgeline_upstream_worker_healthy", "1 when the worker's last /health answered 200.", labels=labels),
            "ejected": GaugeMetricFamily("forgeline_upstream_worker_ejected", "1 while the worker's circuit is open (ejected for failures).", labels=labels),
            "queue_depth": GaugeMetricFamily("forgeline_upstream_worker_num_requests_waiting", "Requests waiting in the worker's own queue, as it reports them.", labels=labels),
            "kv_cache_usage": GaugeMetricFamily("forgeline_upstream_worker_kv_cache_usage_perc", "Share of the worker's KV cache in use (0..1), as it reports it.", labels=labels),
            "batch": GaugeMetricFamily("forgeline_upstream_worker_batch_size", "Requests in the worker's running batch, as it reports it (vllm:num_requests_running).", labels=labels),
            "seconds_per_token": GaugeMetricFamily("forgeline_upstream_worker_seconds_per_token", "The pool's estimate of the worker's seconds per generated token.", labels=labels),
            "requests": CounterMetricFamily("forgeline_upstream_worker_requests", "Requests sent to the worker (retries included).", labels=labels),
            "ejections": CounterMetricFamily("forgeline_upstream_worker_ejections", "Times the worker was ejected, net of forgiven ones.", labels=labels),
        }  # fmt: skip
        seen: set[int] = set()
        for served in self._models():
            engine = served.engine
            if not isinstance(engine, UpstreamEngine) or id(engine) in seen:
                continue
            seen.add(id(engine))
            now = time.monotonic()
            for worker in engine.pool.workers:
                values = [served.model, served.version, worker.url]
                families["outstanding"].add_metric(values, worker.outstanding)
                families["healthy"].add_metric(values, float(worker.healthy))
                families["ejected"].add_metric(values, float(worker.ejected(now)))
                families["queue_depth"].add_metric(values, worker.queue_depth)
                families["kv_cache_usage"].add_metric(values, worker.kv_cache_usage)
                batch = engine.reported.get(worker.url, {}).get("num_requests_running")
                if batch is not None:
                    families["batch"].add_metric(values, batch)
                families["seconds_per_token"].add_metric(values, worker.seconds_per_token or 0.0)
                families["requests"].add_metric(values, worker.requests)
                families["ejections"].add_metric(values, worker.ejections)
        yield from families.values()


VLLM_NAMES: dict[str, str] = {
    "vllm:time_to_first_token_seconds": "forgeline_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": "forgeline_inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds": "forgeline_inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds": "forgeline_e2e_request_latency_seconds",
    "vllm:prompt_tokens_total": "forgeline_prompt_tokens_total",
    "vllm:generation_tokens_total": "forgeline_generation_tokens_total",
    "vllm:request_success_total": "forgeline_requests_total{status<400}",
    "vllm:num_requests_running": "forgeline_num_requests_running, or upstream: forgeline_upstream_worker_requests_running summed",
    "vllm:num_requests_waiting": "forgeline_num_requests_waiting, or upstream: what the workers report, summed",
    "vllm:gpu_cache_usage_perc": "forgeline_upstream_worker_kv_cache_usage_perc (per worker)",
    "vllm:kv_cache_usage_perc": "forgeline_upstream_worker_kv_cache_usage_perc (per worker)",
}
"""Each vLLM series the gateway exports (labelled ``model_name``, plus ``worker`` for the per-worker
gauges) -> the forgeline series it is derived from (summed over version and adapter)."""


class _VllmCollector(Collector):
    """Our measurements under vLLM's names and ``model_name`` label, computed at scrape time."""

    def __init__(
        self, metrics: GatewayMetrics, models: Callable[[], Iterable[ServedModel]], families: Families | None = None
    ) -> None:
        self._metrics = metrics
        self._models = models
        self._families: Families = families or (lambda metric: metric.collect())

    def collect(self) -> Iterable[Any]:
        m = self._metrics
        for name, source in (
            ("vllm:time_to_first_token_seconds", m.ttft),
            ("vllm:inter_token_latency_seconds", m.itl),
            ("vllm:time_per_output_token_seconds", m.itl),  # vLLM's older name for the same measurement
            ("vllm:e2e_request_latency_seconds", m.e2e),
        ):
            yield _histogram_by_model(name, self._families(source), source._documentation)
        for name, counter in (("vllm:prompt_tokens", m.prompt_tokens), ("vllm:generation_tokens", m.generation_tokens)):
            family = CounterMetricFamily(name, counter._documentation, labels=["model_name"])
            for model, value in _summed_by(self._families(counter), "_total", "model").items():
                family.add_metric([model], value)
            yield family
        success = CounterMetricFamily("vllm:request_success", "Requests answered successfully.", labels=["model_name"])
        ok: dict[str, float] = {}
        for sample in _samples(self._families(m.requests), "_total"):
            if int(sample.labels.get("status", "500")) < 400:
                ok[sample.labels["model"]] = ok.get(sample.labels["model"], 0.0) + sample.value
        for model, value in ok.items():
            success.add_metric([model], value)
        yield success
        yield from self._gauges()

    def _gauges(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running (in the engine's batch, or on the workers).", labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run.", labels=["model_name"])
        gpu = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache use of each worker (0..1), as it reports it.", labels=["model_name", "worker"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache use of each worker (0..1), as it reports it.", labels=["model_name", "worker"])
        totals: dict[str, list[float]] = {}
        seen: set[int] = set()
        for served in self._models():
            engine = served.engine
            if id(engine) in seen:
                continue
            seen.add(id(engine))
            total = totals.setdefault(served.model, [0.0, 0.0])
            if isinstance(engine, UpstreamEngine):
                for worker in engine.pool.workers:
                    reported = engine.reported.get(worker.url, {})
                    total[0] += worker.outstanding
                    total[1] += reported.get("num_requests_waiting", 0.0)
                    if "kv_cache_usage_perc" in reported:
                        gpu.add_metric([served.model, worker.url], reported["kv_cache_usage_perc"])
                        kv.add_metric([served.model, worker.url], reported["kv_cache_usage_perc"])
                continue
            snapshot = engine.stats()
            if snapshot is not None:
                total[0] += snapshot.running
                total[1] += snapshot.waiting
        for model, (run, wait) in totals.items():
            running.add_metric([model], run)
            waiting.add_metric([model], wait)
        yield from (running, waiting, gpu, kv)


def _samples(families: Iterable[Metric], suffix: str) -> Iterable[Any]:
    for family in families:
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


def _summed_by(families: Iterable[Metric], suffix: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for sample in _samples(families, suffix):
        out[sample.labels[label]] = out.get(sample.labels[label], 0.0) + sample.value
    return out


def _histogram_by_model(name: str, families: Iterable[Metric], documentation: str) -> HistogramMetricFamily:
    """A histogram's ``families`` (labelled model, version, adapter) summed into one histogram per model."""
    buckets: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            model = sample.labels["model"]
            if sample.name.endswith("_bucket"):
                per = buckets.setdefault(model, {})
                per[sample.labels["le"]] = per.get(sample.labels["le"], 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                sums[model] = sums.get(model, 0.0) + sample.value
    family = HistogramMetricFamily(name, documentation, labels=["model_name"])
    for model, per in buckets.items():
        ordered = sorted(per.items(), key=lambda kv: float(kv[0]))
        family.add_metric([model], buckets=ordered, sum_value=sums.get(model, 0.0))
    return family


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """``count`` observations of ``value`` in one labelled histogram, at the cost of one.

    A streamed answer's tokens often arrive several to a read and share one gap; observed one
    by one, a 16-token stream scanned the buckets 16 times. prometheus_client keeps a sum and
    one count per bucket (cumulated when scraped), so the same state is one addition to each.
    A single observation takes the same path: `Histogram.observe` costs three Python calls
    more, and a relayed stream whose events come a read each observes one per read.
    """
    if count <= 0:
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:  # not the layout this relies on
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect.bisect_left(bounds, value)].inc(count)  # the first bound >= value, as observe() finds it


class Children(dict[tuple[Any, ...], Any]):
    """A labelled metric's children by their label values: ``children[values]``, one dict read.

    prometheus_client's ``labels()`` validates, converts and looks the values up under a lock
    on every call: about a dozen Python calls, several times per request
    (BENCHMARKS.md §1, seventh pass). The children it returns are the same objects every
    time, so they are kept here on first use. Not for a metric whose children are ever
    removed (``remove()``, ``clear()``): a kept child would then no longer be exported.
    Values may be of any type ``labels()`` takes (it converts them with ``str``).
    """

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, values: tuple[Any, ...]) -> Any:
        child = self[values] = self.metric.labels(*values)
        return child


class GatewayMetrics:
    """Every metric the gateway exports, on its own registry.

    Args:
        per_key: label request and token counters with the API key's id (off by default:
            one series per key and model multiplies quickly; the access log has the key).
    """

    def __init__(self, *, per_key: bool = False) -> None:
        self.registry = CollectorRegistry()
        self._models: Callable[[], Iterable[ServedModel]] | None = None
        self.per_key = per_key
        r = self.registry
        per_request = ["model", "version", "adapter"]
        keyed = [*per_request, "key"] if per_key else per_request
        self.requests = Counter(
            "forgeline_requests",
            "Generation requests by outcome (status is the HTTP status, 499 when the client left).",
            [*keyed, "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("forgeline_prompt_tokens", "Prompt tokens processed.", keyed, registry=r)
        self.generation_tokens = Counter("forgeline_generation_tokens", "Completion tokens generated.", keyed, registry=r)
        self.ttft = Histogram(
            "forgeline_time_to_first_token_seconds", "Time to first token.", per_request, buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "forgeline_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            per_request,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "forgeline_e2e_request_latency_seconds",
            "End-to-end request latency, from routing to the last token.",
            per_request,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "forgeline_batch_size", "Rows in each engine decode step.", ["model", "version"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.http_requests = Counter(
            "forgeline_http_requests", "Every HTTP request by route and status.", ["path", "status"], registry=r
        )
        self.model_swaps = Counter(
            "forgeline_model_swaps", "Hot swaps: an alias moved and a new version took over.", ["model"], registry=r
        )
        self.canary_active = Gauge(
            "forgeline_canary_active", "1 while a canary version receives traffic.", ["model", "version"], registry=r,
            multiprocess_mode="max",  # every process routes the same canary
        )
        self.canary_rollbacks = Counter(
            "forgeline_canary_rollbacks", "Canaries stopped for breaching their SLO.", ["model"], registry=r
        )
        # The per-request metrics' children, looked up once per label values (none is ever removed).
        self.requests_by = Children(self.requests)
        self.prompt_tokens_by = Children(self.prompt_tokens)
        self.generation_tokens_by = Children(self.generation_tokens)
        self.ttft_by = Children(self.ttft)
        self.itl_by = Children(self.itl)
        self.e2e_by = Children(self.e2e)
        self.http_requests_by = Children(self.http_requests)

    def count(self, labels: tuple[str, str, str], key: str, status: int, prompt_tokens: int, completion_tokens: int, *, tokens: bool) -> None:
        """Count one finished request (and, with ``tokens``, its prompt and completion tokens)."""
        keyed = (*labels, key) if self.per_key else labels
        self.requests_by[(*keyed, status)].inc()
        if tokens:
            self.prompt_tokens_by[keyed].inc(prompt_tokens)
            self.generation_tokens_by[keyed].inc(completion_tokens)

    def watch(self, catalog: ModelCatalog) -> None:
        """Export engine gauges for ``catalog``'s models and count their decode batch sizes."""
        # A rolling catalog also has versions that are loaded but not routed (canaries, draining).
        models = catalog.loaded
        self._models = models
        self.registry.register(_EngineCollector(models))
        self.registry.register(_PoolCollector(models))
        self.registry.register(_VllmCollector(self, models))

    def attach_engine(self, served: ServedModel) -> None:
        """Observe the batch size of every decode step of ``served``'s engine (when it runs them itself)."""
        if served.engine.stats() is None:  # its workers decode; no step of its own to observe
            return
        served.engine.step_listener = self.batch_size.labels(served.model, served.version).observe

    def render(self) -> bytes:
        """The text exposition format.

        Under ``PROMETHEUS_MULTIPROC_DIR`` (`forgeline serve --workers N`) the counters and
        histograms are summed over every process, whichever answers the scrape; the engine and
        pool gauges are this process's view (each process routes to the same workers).
        """
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry)
        shared = list(MultiProcessCollector(None, path=path).collect())
        by_name: dict[str, list[Metric]] = {}
        for family in shared:
            by_name.setdefault(family.name, []).append(family)
        registry = CollectorRegistry()
        registry.register(_Fixed(shared))
        if self._models is not None:
            registry.register(_EngineCollector(self._models))
            registry.register(_PoolCollector(self._models))
            registry.register(_VllmCollector(self, self._models, lambda metric: by_name.get(metric._name, [])))
        return generate_latest(registry)


class _Fixed(Collector):
    """Families collected already (the processes' shared metrics, read once per scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus scrape endpoint (no key needed, like /health)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class AccessLogMiddleware:
    """One JSON access-log line per request, written when the response body ends.

    Streaming responses are logged when the stream ends, so durations and token counts
    cover the whole stream. Handlers add fields through ``request.state.access``.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        request_id = request_ids.from_header(_header(scope, b"x-request-id"))
        token = request_ids.current.set(request_id)
        fields: dict[str, Any] = {}
        state["access"] = fields
        closers: list[Callable[[], None]] = []
        state["on_close"] = closers
        status = 0
        logged = False
        path = scope.get("path", "")
        span, otel_token = None, None
        if telemetry.enabled() and path not in _PROBES:
            span, otel_token = telemetry.start_request_span(
                f"{scope.get('method')} {path}",
                {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ()) if k in _TRACE_HEADERS},
                {"http.request.method": scope.get("method"), "url.path": path, "http.request.header.x-request-id": request_id},
            )

        def log(final_status: int) -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            telemetry.end_request_span(span, final_status, fields)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests_by[(template, final_status)].inc()
            if path in _PROBES and final_status < 400:
                return  # probes would drown the log
            entry = {
                "ts": round(time.time(), 3),
                "method": scope.get("method"),
                "path": path,
                "status": final_status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "client": (scope.get("client") or ("", 0))[0],
                "key_id": state.get("key_id"),
                "request_id": request_id,
                "pid": os.getpid(),  # which process answered, with `forgeline serve --workers N`
                **fields,
            }
            if access_logger.isEnabledFor(logging.INFO):
                write_access(_ACCESS_JSON.encode(entry))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log(status)

        try:
            if _declared_length(scope) > self.max_body_bytes:
                await _too_large(send_wrapper, self.max_body_bytes)
            else:
                await self.app(scope, _limited(receive, self.max_body_bytes), send_wrapper)
        finally:
            for close in closers:
                try:
                    close()
                except Exception:  # noqa: BLE001 - one failing closer must not skip the others
                    logger.exception("closing request state failed")
            log(status or 499)
            request_ids.current.reset(token)
            telemetry.detach(otel_token)


def write_access(line: str) -> None:
    """Log one access-log line at INFO on ``forgeline.access`` (the caller checked that INFO is on).

    As ``access_logger.info(line)`` does, but naming its own code as the record's caller: the
    frame walk that ``info`` makes to find it was a dozen Python calls per request.
    """
    code = write_access.__code__
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, code.co_filename, code.co_firstlineno, line, None, None, "write_access"
    )
    access_logger.handle(record)


_PROBES = ("/metrics", "/health", "/ready")
_ACCESS_JSON = json.JSONEncoder(separators=(",", ":"), default=str)  # built once, not per line
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class BodyTooLargeError(StarletteHTTPException):
    """Raised while reading a body past the limit; FastAPI passes HTTP exceptions to the
    app's handlers (other errors become a generic 400), which render an OpenAI 413."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _limited(receive: Receive, limit: int) -> Receive:
    """A receive that raises once more than ``limit`` body bytes arrived (chunked uploads)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLargeError
        return message

    return wrapped


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(error_body(too_large_message(limit), 413, code="payload_too_large")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
