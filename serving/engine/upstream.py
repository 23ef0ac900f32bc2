"""An upstream OpenAI-compatible worker behind the `Engine` seam.

The gateway keeps doing what only it does (keys, quotas, aliases, chat templates, usage)
and relays generation to a pool of workers over HTTP: ``trtllm-serve`` on H200s, any vLLM
or SGLang server, or ``forgeline worker`` (our PyTorch engine). A streamed request is one
streamed ``POST /v1/completions`` whose chunks are relayed as they arrive, so time to first
token is the worker's; a unary one asks for the whole answer at once (`complete`), which
costs the gateway one body to parse instead of an event per token, and can be retried on
another worker if the first dies mid-answer, since nothing has reached the client. With ``upstream_api="chat"`` the engine is also a `ChatRelay`: chat requests
go whole to the workers' ``/v1/chat/completions``, so tools, JSON schema, logprobs and
``n`` work wherever the worker supports them.

Which worker answers is `serving.engine.pool.WorkerPool`'s decision; this module reports
each request's outcome to it, polls every worker's ``/health`` in the background (and,
with ``scrape_queue``, its ``vllm:num_requests_waiting`` and KV-cache use), re-runs discovery, and retries
a request on another worker while nothing of it has reached the client yet.

Adapters travel the way the worker expects (``adapter_mode``):

* ``lora_request`` (TensorRT-LLM): ``{"lora_request": {"lora_name", "lora_int_id", "lora_path"}}``
  in the body, with the adapter folder as the worker sees it;
* ``model`` (vLLM ``--lora-modules``, ``forgeline worker --adapter``): the adapter is
  a model of its own, named by ``adapter_model_template``;
* ``none``: the worker serves merged models only.

A worker reports token counts, not token ids, so `Chunk.token_ids` of an upstream
stream holds `UNKNOWN_TOKEN_ID` placeholders: their number is the worker's
``usage.completion_tokens`` (asked for with ``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from registry.errors import ErrorCode, ForgelineError, ModelNotFoundError
from serving import request_id, telemetry
from serving.engine.base import Chunk, FinishReason, RelayedAnswer, SamplingParams
from serving.engine.pool import Outcome, PoolPolicy, Worker, WorkerPool
from serving.engine.sse_relay import SseBlock, WorkerEventError, inspect, whole_events
from serving.engine.worker_http import (
    HttpxWorkerClient,
    WorkerBrokenError,
    WorkerClient,
    WorkerError,
    WorkerRefusedError,
    WorkerTimeoutError,
)
from serving.engine.worker_wire import WireWorkerClient
from serving.stop_tokens import read_stop_token_ids

logger = logging.getLogger(__name__)

AdapterMode = Literal["lora_request", "model", "none"]
UpstreamApi = Literal["completions", "chat"]
Discovery = Callable[[], Awaitable[list[str]]]
"""Answers the pool's worker URLs now (see `serving.engine.discovery`)."""

_QUEUE_METRIC = re.compile(r"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)
_RUNNING_METRIC = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)
# vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (0.10); either is a 0..1 share.
_KV_METRIC = re.compile(r"^vllm:(?:gpu|kv)_cache_usage_perc(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)

UNKNOWN_TOKEN_ID = -1
"""Stands in for a generated token whose id the worker did not report."""

_STATUS_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
}


def _upstream_error(status: int, body: bytes | str, model_id: str) -> ForgelineError:
    """A ForgelineError for a worker's error response, keeping its message and param."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    message, param, code = text.strip()[:500] or f"HTTP {status}", None, None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(text).get("error") or {}
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            param = error.get("param")
            code = error.get("code")
        elif isinstance(error, str):
            message = error
    if status == 404 and code == ErrorCode.MODEL_NOT_FOUND:
        return ModelNotFoundError(message, param=param or "model")
    if status in _STATUS_CODES:
        return ForgelineError(message, code=_STATUS_CODES[status], param=param)
    # 401/403/5xx: the client did nothing wrong; the worker is down or misconfigured.
    return ForgelineError(f"upstream worker for `{model_id}` failed (HTTP {status}): {message}", code=ErrorCode.UNAVAILABLE)


def _finish_reason(value: Any) -> FinishReason:
    return "length" if value == "length" else "stop"


class UpstreamEngine:
    """Generate through a pool of OpenAI-compatible workers (``/v1/completions`` with streaming).

    Args:
        base_url: the worker, e.g. ``http://10.0.0.7:8000`` (no ``/v1``), or a list of
            workers that all serve ``model`` (a static pool).
        model: the ``model`` the worker expects (``trtllm-serve``: the path it was started with).
        api_key: sent as ``Authorization: Bearer`` when set.
        tokenizer: folder (or hub id) of the model's tokenizer, used for chat templates and
            prompt token counts; default: ``model`` when that is a local folder.
        adapters: adapter name -> path as the worker sees it (``lora_request`` mode), or the
            adapters the worker serves (``model`` mode; None lets the worker decide).
        adapter_mode: how adapters are passed; see the module docstring.
        adapter_model_template: ``model`` mode: the worker's model name for an adapter,
            formatted with ``model`` and ``adapter``.
        model_id: name used in logs and errors; defaults to ``model``.
        connect_timeout: seconds to connect to the worker.
        read_timeout: longest silence, in seconds, between two chunks before the request fails.
        unary_timeout: longest wait, in seconds, for a whole non-streamed answer (the worker
            sends nothing until it has generated all of it). A request that runs out of it is
            not retried elsewhere: the worker may still be generating.
        health_interval: seconds between ``/health`` polls of each worker.
        metrics_path: the worker's metrics endpoint (``trtllm-serve``: ``/metrics`` has iteration
            stats as JSON; newer releases add Prometheus text at ``/prometheus/metrics``).
        upstream_api: ``chat`` when the workers speak ``/v1/chat/completions`` and chat
            requests should pass through to them whole; ``completions`` renders chat here.
        discovery: re-run every ``discovery_interval`` seconds to follow workers that come
            and go (e.g. `serving.engine.discovery.DnsDiscovery`); None: ``base_url`` only.
        discovery_interval: seconds between discovery runs.
        policy: the pool's ejection, routing and retry settings.
        scrape_queue: read each worker's ``vllm:num_requests_waiting`` and KV-cache use from ``metrics_path``
            with every health check, and route by it.
        transport: an httpx transport (tests script workers with it); without one the
            workers are reached over `serving.engine.worker_wire`.
    """

    # `/v1/completions` answers carry logprobs in another shape; chat that wants them passes through.
    reports_logprobs = False

    step_listener: Callable[[int], None] | None = None
    """Never called: the workers run the decode steps (their metrics say how)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        *,
        api_key: str | None = None,
        tokenizer: str | Path | None = None,
        adapters: Mapping[str, str] | None = None,
        adapter_mode: AdapterMode = "lora_request",
        adapter_model_template: str = "{adapter}",
        model_id: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        unary_timeout: float = 600.0,
        health_interval: float = 5.0,
        metrics_path: str = "/metrics",
        upstream_api: UpstreamApi = "completions",
        discovery: Discovery | None = None,
        discovery_interval: float = 10.0,
        policy: PoolPolicy | None = None,
        scrape_queue: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if adapter_mode not in ("lora_request", "model", "none"):
            raise ValueError(f"adapter_mode must be lora_request, model or none, got {adapter_mode!r}")
        if upstream_api not in ("completions", "chat"):
            raise ValueError(f"upstream_api must be completions or chat, got {upstream_api!r}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls and discovery is None:
            raise ValueError("an upstream engine needs at least one worker URL or a discovery")
        self.base_url = urls[0].rstrip("/") if urls else ""
        self.model = model
        self.model_id = model_id or model
        self.adapter_mode: AdapterMode = adapter_mode
        self.adapter_model_template = adapter_model_template
        self.adapters = dict(adapters) if adapters is not None else None
        # lora_int_id must name the same adapter on every request: number them in a fixed order.
        self._lora_ids = {name: i for i, name in enumerate(sorted(self.adapters or {}))}
        self.metrics_path = metrics_path
        self.upstream_api: UpstreamApi = upstream_api
        self.pool = WorkerPool(urls, policy=policy, name=self.model_id)
        self._discovery = discovery
        self._discovery_interval = discovery_interval
        self._scrape_queue = scrape_queue
        self._tokenizer_src = tokenizer if tokenizer is not None else (model if Path(model).is_dir() else None)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._unary_timeout = max(unary_timeout, read_timeout)
        self._health_interval = health_interval
        self._transport = transport
        self._client: WorkerClient | None = None
        self._tokenizer: Any = None
        self._stop_token_ids: list[int] = []
        self._started = False
        self._poller: asyncio.Task[None] | None = None
        self.reported: dict[str, dict[str, float]] = {}
        """Per worker URL: the vLLM gauges it last reported (``scrape_queue``): waiting, running, KV-cache use."""

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while started and at least one worker's last ``/health`` answered 200."""
        return self._started and any(w.healthy and not w.draining for w in self.pool.workers)

    @property
    def serves_adapters(self) -> bool:
        """Whether requests may name an adapter (see ``adapter_mode``)."""
        return self.adapter_mode == "model" or (self.adapter_mode == "lora_request" and self.adapters is not None)

    def stats(self) -> None:
        """None: the queues live in the workers (the pool's metrics report them per worker)."""
        return None

    @property
    def chat_relay(self) -> UpstreamEngine | None:
        """This engine when its workers take chat requests whole (``upstream_api="chat"``), else None."""
        return self if self.upstream_api == "chat" else None

    async def start(self) -> None:
        """Load the tokenizer, connect, probe every worker's ``/health`` once and keep polling.

        A worker that is still loading does not stop the gateway: the model shows as not
        ready on ``/ready`` until one of its workers answers.

        Raises:
            ForgelineError: ``invalid_config`` when no tokenizer is known.
        """
        if self._started:
            return
        if self._tokenizer_src is None:
            raise ForgelineError(
                f"upstream model `{self.model_id}` needs its tokenizer (chat template, prompt token counts); "
                "pass tokenizer= the model's folder",
                code=ErrorCode.INVALID_CONFIG,
                param="tokenizer",
            )
        from transformers import AutoTokenizer

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._tokenizer_src)
        # The worker may stop at its tokenizer's eos only (one id); the model's turn can end with
        # another one (Llama-3 <|eot_id|>), so every request names them all.
        self._stop_token_ids = read_stop_token_ids(self._tokenizer_src, self._tokenizer)
        # Keep-alive connections without a cap, per worker, so steady load never reconnects.
        timeouts = {"connect_timeout": self._connect_timeout, "read_timeout": self._read_timeout}
        if self._transport is not None:
            self._client = HttpxWorkerClient(headers=self._headers, transport=self._transport, **timeouts)
        else:
            self._client = WireWorkerClient(headers=self._headers, **timeouts)
        self._started = True
        await self._discover()
        await self._check_all()
        if not self.ready:
            logger.warning("no upstream worker for %s is healthy yet (%s)", self.model_id, ", ".join(w.url for w in self.pool.workers))
        self._poller = asyncio.create_task(self._poll(), name=f"health-{self.model_id}")
        logger.info("upstream engine %s -> %s (%s)", self.model_id, ", ".join(w.url for w in self.pool.workers), self.model)

    async def stop(self) -> None:
        """Stop polling and close connections; in-flight streams end with an error."""
        self._started = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check_health(self) -> bool:
        """Check every worker's ``/health`` now; True when at least one answers 200."""
        await self._check_all()
        return any(w.healthy for w in self.pool.workers)

    async def _check_all(self) -> None:
        workers = [w for w in self.pool.workers if not w.draining]
        await asyncio.gather(*(self._check(w) for w in workers))

    async def _check(self, worker: Worker) -> None:
        if self._client is None:
            return
        queue = kv = None
        try:
            response = await self._client.get(worker.url + "/health", timeout=min(5.0, max(self._health_interval, 0.5)))
            ok = response.status == 200
            if ok and self._scrape_queue:
                text = (await self._client.get(worker.url + self.metrics_path, timeout=5.0)).text
                queue, kv = _summed(_QUEUE_METRIC, text), _summed(_KV_METRIC, text)
                running = _summed(_RUNNING_METRIC, text)
                # Re-exported by the gateway's /metrics, per worker (what the worker itself said).
                self.reported[worker.url] = {
                    k: v for k, v in (("num_requests_waiting", queue), ("num_requests_running", running), ("kv_cache_usage_perc", kv)) if v is not None
                }
        except WorkerError as exc:
            logger.debug("health of %s failed: %s", worker.url, exc)
            ok = False
        self.pool.health_checked(worker, ok, queue_depth=queue, kv_cache_usage=kv)

    async def _discover(self) -> None:
        if self._discovery is not None:
            urls = await self._discovery()
            if urls:  # an empty answer is more likely a discovery fault than an empty fleet
                self.pool.set_members(urls)

    async def _poll(self) -> None:
        next_discovery = time.monotonic() + self._discovery_interval
        while True:
            await asyncio.sleep(self._health_interval)
            if self._discovery is not None and time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + self._discovery_interval
                try:
                    await self._discover()
                except Exception:  # noqa: BLE001 - a discovery fault must not stop health checks
                    logger.warning("discovery for %s failed", self.model_id, exc_info=True)
            await self._check_all()

    async def scrape_metrics(self) -> str:
        """A worker's metrics endpoint, as text (Prometheus exposition or JSON, by worker)."""
        client = self._require_client()
        worker = self.pool.pick()
        try:
            response = await client.get(worker.url + self.metrics_path, timeout=self._read_timeout)
        except WorkerError as exc:
            raise self._unavailable(f"metrics scrape failed: {exc}") from exc
        if response.status != 200:
            raise _upstream_error(response.status, response.body, self.model_id)
        return response.text

    # -- text helpers ------------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None or not self._started:
            raise self._unavailable("engine is not running")
        return self._tokenizer

    def _require_client(self) -> WorkerClient:
        if self._client is None:
            raise self._unavailable("engine is not running")
        return self._client

    def _unavailable(self, why: str) -> ForgelineError:
        return ForgelineError(f"upstream worker for model `{self.model_id}` is unavailable: {why}", code=ErrorCode.UNAVAILABLE)

    def render_chat(self, messages: list[dict[str, str]], *, adapter: str | None = None) -> str:
        """Render chat messages with the artifact's chat template, ready for the assistant turn.

        Adapters live on the workers, which were built with the artifact's template, so
        ``adapter`` does not change the template here.
        """
        tokenizer = self._require_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ForgelineError(
                f"model `{self.model_id}` has no chat template; use /v1/completions", code=ErrorCode.INVALID_REQUEST, param="messages"
            )
        from jinja2 import TemplateError

        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError as exc:
            raise ForgelineError(f"the chat template rejected the messages: {exc}", code=ErrorCode.INVALID_REQUEST, param="messages") from exc

    def count_tokens(self, text: str) -> int:
        """Prompt tokens for ``text`` (a BOS is added only when the text does not start with one)."""
        tokenizer = self._require_tokenizer()
        bos = tokenizer.bos_token
        return len(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])

    # -- generation --------------------------------------------------------------------

    def request_body(self, prompt: str, params: SamplingParams, adapter: str | None) -> dict[str, Any]:
        """The ``/v1/completions`` body for one request (public so its shape can be checked).

        Raises:
            ModelNotFoundError: the adapter is unknown, or the worker serves no adapters.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        stop_ids = list(dict.fromkeys([*self._stop_token_ids, *params.stop_token_ids]))
        if stop_ids:
            body["stop_token_ids"] = stop_ids  # trtllm-serve's and vLLM's completions field
        if params.seed is not None:
            body["seed"] = params.seed
        return self.route_adapter(body, adapter)

    def route_adapter(self, body: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        """``body`` addressed to the worker's model, and to ``adapter`` the way the worker expects.

        Raises:
            ModelNotFoundError: the adapter is unknown, or the worker serves no adapters.
        """
        body["model"] = self.model
        if adapter is None:
            return body
        known = self.adapters is None or adapter in self.adapters
        if self.adapter_mode == "none" or not known or (self.adapter_mode == "lora_request" and self.adapters is None):
            raise ModelNotFoundError(f"model `{self.model_id}` has no adapter `{adapter}`", param="model")
        if self.adapter_mode == "lora_request":
            assert self.adapters is not None
            body["lora_request"] = {"lora_name": adapter, "lora_int_id": self._lora_ids[adapter], "lora_path": self.adapters[adapter]}
        else:
            body["model"] = self.adapter_model_template.format(model=self.model, adapter=adapter)
        return body

    async def generate(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """Stream a worker's completion of ``prompt``; the last chunk has a ``finish_reason``.

        Raises:
            ForgelineError: the worker's own error (same code: bad request, unknown model),
                or ``unavailable`` when no worker can be reached, one stops answering for
                ``read_timeout`` seconds, or drops the stream before it finished.
        """
        body = self.request_body(prompt, params, adapter)
        texts: list[str] = []
        finish: FinishReason | None = None
        completion_tokens: int | None = None
        async for event in self._stream_events("/v1/completions", body, adapter):
            usage = event.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                completion_tokens = int(usage["completion_tokens"])
            for choice in event.get("choices") or []:
                text = choice.get("text") or ""
                if choice.get("finish_reason") is not None:
                    # Held back: the usage event that carries the token count comes after it.
                    finish = _finish_reason(choice["finish_reason"])
                    texts.append(text)
                elif text:
                    texts.append(text)
                    yield Chunk(text=text, token_ids=[])
        if finish is None:
            raise self._unavailable("the stream ended before the completion finished")
        tail = texts[-1] if texts else ""
        if completion_tokens is None:
            # The worker did not report usage: count the text ourselves.
            completion_tokens = len(self._require_tokenizer()("".join(texts), add_special_tokens=False)["input_ids"])
        yield Chunk(text=tail, token_ids=[UNKNOWN_TOKEN_ID] * completion_tokens, finish_reason=finish)

    # -- chat pass-through (ChatRelay) -------------------------------------------------

    async def relay_chat(self, body: dict[str, Any], *, adapter: str | None = None) -> RelayedAnswer:
        """Send a non-streamed chat request to a worker and return its answer.

        Nothing reaches the client before the whole answer is here, so a failed attempt is
        retried on another worker (within the retry budget).

        Raises:
            ForgelineError: the worker's own 4xx error, or ``unavailable``.
        """
        body = self.route_adapter({**body, "stream": False}, adapter)
        body.pop("stream_options", None)
        answer, raw = await self._post_unary("/v1/chat/completions", body, adapter)
        return RelayedAnswer(raw, answer)

    async def complete(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> tuple[str, int, FinishReason]:
        """A whole, non-streamed completion of ``prompt``: ``(text, completion tokens, finish reason)``.

        For a client that asked for no stream: one answer instead of an event per token
        costs the gateway less, and since nothing of it reaches the client before it is
        whole, a worker that fails or dies mid-answer is retried on another (within the
        retry budget), as `relay_chat` is.

        Raises:
            ForgelineError: the worker's own 4xx error, or ``unavailable``.
        """
        body = self.request_body(prompt, params, adapter)
        body["stream"] = False
        body.pop("stream_options", None)
        answer, _ = await self._post_unary("/v1/completions", body, adapter)
        choice = (answer.get("choices") or [{}])[0]
        text = str(choice.get("text") or "")
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        if tokens is None:  # the worker did not report usage: count the text ourselves
            tokens = len(self._require_tokenizer()(text, add_special_tokens=False)["input_ids"])
        return text, int(tokens), _finish_reason(choice.get("finish_reason"))

    async def _post_unary(self, path: str, body: dict[str, Any], adapter: str | None) -> tuple[dict[str, Any], bytes]:
        """POST a non-streamed request to a worker and return its JSON answer (parsed, and as sent), retrying
        failed attempts on other workers within the pool's retry budget."""
        client = self._require_client()
        tried: list[Worker] = []
        budgeted = False  # this attempt holds a retry from the pool's budget
        while True:
            worker = self.pool.pick(adapter, tried)
            retried = bool(tried)
            self.pool.begin(worker)
            started, outcome, tokens = time.perf_counter(), Outcome.ERROR, 0
            error: ForgelineError
            fatal = False  # the request itself is wrong: another worker would say the same
            attempt = _attempt_span(worker, path, retried)
            failure: BaseException | None = None
            try:
                response = await client.post_json(worker.url + path, body, _request_headers(attempt), timeout=self._unary_timeout)
                telemetry.end_span(attempt, **{"http.response.status_code": response.status})
                attempt = None
                if response.status == 200:
                    answer = response.json()
                    usage = answer.get("usage") or {}
                    tokens, outcome = int(usage.get("completion_tokens") or 0), Outcome.OK
                    return answer, response.body
                error = _upstream_error(response.status, response.body, self.model_id)
                if response.status < 500:
                    outcome = Outcome.OK  # the worker is fine; 429 alone is worth another worker
                    fatal = response.status != 429
            except asyncio.CancelledError as exc:
                outcome, started, failure = Outcome.OK, float("inf"), exc  # the client left; the worker did nothing wrong
                raise
            except (WorkerRefusedError, WorkerBrokenError) as exc:
                failure = exc
                outcome, error = _refused_or_error(exc), self._unavailable(f"{worker.url}: {exc}")
            except WorkerTimeoutError as exc:
                failure, fatal = exc, True  # it may still be generating: another worker would double the work
                error = self._unavailable(f"{worker.url} gave no answer within {self._unary_timeout:.0f} s ({exc})")
            except WorkerError as exc:
                failure, error = exc, self._unavailable(f"{worker.url}: {exc}")
            except ValueError as exc:
                error = self._unavailable(f"{worker.url} answered with a body that is not JSON: {exc}")
            except BaseException as exc:
                failure = exc
                raise
            finally:
                # Ended here only when no answer came: the exception says why.
                telemetry.end_span(attempt, error=failure)
                elapsed = time.perf_counter() - started if outcome is Outcome.OK else 0.0
                self.pool.end(worker, outcome, seconds=max(0.0, elapsed), tokens=tokens, adapter=adapter)
                if budgeted:
                    self.pool.end_retry()
            tried.append(worker)
            if fatal:
                raise error
            budgeted = self._may_retry(tried, lost=isinstance(failure, WorkerRefusedError | WorkerBrokenError))
            if budgeted is None:
                raise error
            logger.info("retrying a %s request on another worker after %s: %s", self.model_id, worker.url, error.message)

    def relay_chat_stream(
        self, body: dict[str, Any], *, adapter: str | None = None, include_usage: bool = False
    ) -> AsyncGenerator[SseBlock, None]:
        """Stream a chat request's events from a worker, as the bytes it sent (``[DONE]`` left out).

        Each `SseBlock` holds the whole events one read from the worker delivered, so the
        caller can write them to its client at once. The worker is asked for usage
        (``stream_options.include_usage``) so the gateway can count tokens; the usage-only
        event is left out unless ``include_usage`` (the client asked for it too).
        Retried on another worker only until the first block is yielded.
        """
        body = self.route_adapter({**body, "stream": True}, adapter)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return self._stream_blocks("/v1/chat/completions", body, adapter, keep_usage=include_usage)

    def _may_retry(self, tried: list[Worker], *, lost: bool = False) -> bool | None:
        """Whether to try another worker: None for no, else whether the retry holds one of the
        budget's (then release it with ``pool.end_retry()``).

        The budget keeps a worker that answers errors from doubling the others' load. A lost
        connection (refused, or closed mid-answer) is not that: a refused one reached no
        worker, and a closed one ended the worker's work with it, so its retry moves load
        instead of adding it and is free (``max_attempts`` still bounds it). A worker that
        dies takes every request it was answering with it, often more than the budget's
        floor, and refuses those routed to it before it is ejected; none of them may fail."""
        others = sum(1 for w in self.pool.workers if not w.draining and w not in tried)
        if others == 0 or len(tried) >= self.pool.policy.max_attempts:
            return None
        if lost:
            return False
        return True if self.pool.take_retry() else None

    async def _stream_events(self, path: str, body: dict[str, Any], adapter: str | None) -> AsyncGenerator[dict[str, Any], None]:
        """POST a streamed request to a worker and yield its SSE events as JSON objects (see `_stream_blocks`)."""
        blocks = self._stream_blocks(path, body, adapter, keep_usage=True)
        try:
            async for block in blocks:
                for payload in block.payloads():
                    try:
                        event = json.loads(payload)
                    except ValueError as exc:
                        raise self._unavailable(f"a worker sent an event that is not JSON: {exc}") from exc
                    yield event
        finally:
            await blocks.aclose()

    async def _stream_blocks(self, path: str, body: dict[str, Any], adapter: str | None, *, keep_usage: bool) -> AsyncGenerator[SseBlock, None]:
        """POST a streamed request to a worker and yield its whole SSE events, a block per read.

        A request that fails before its first event is retried on another worker, within
        the pool's retry budget; after that a failure ends the stream with ``unavailable``.
        """
        client = self._require_client()
        tried: list[Worker] = []
        budgeted = False  # this attempt holds a retry from the pool's budget
        while True:
            worker = self.pool.pick(adapter, tried)
            retried = bool(tried)
            self.pool.begin(worker)
            started, outcome, tokens, yielded, done = time.perf_counter(), Outcome.ERROR, 0, False, False
            lost = False  # the connection was refused or closed (see _may_retry)
            error: ForgelineError | None = None
            fatal = False  # the request itself is wrong: another worker would say the same
            attempt = _attempt_span(worker, path, retried)
            try:
                async with client.stream(worker.url + path, body, _request_headers(attempt)) as response:
                    if attempt is not None:
                        attempt.set_attribute("http.response.status_code", response.status)
                    if response.status != 200:
                        error = _upstream_error(response.status, await response.read(), self.model_id)
                        if response.status < 500:
                            outcome = Outcome.OK  # the worker is fine; 429 alone is worth another worker
                            fatal = response.status != 429
                    else:
                        async for whole in whole_events(response.chunks()):
                            # After [DONE], read on to the end of the body instead of breaking out: a
                            # connection whose response was not read to the end is closed, not reused,
                            # so breaking made every request open a new TCP connection to the worker.
                            if done:
                                continue
                            block = inspect(whole, keep_usage=keep_usage)
                            done = block.done
                            if block.usage and block.usage.get("completion_tokens") is not None:
                                tokens = int(block.usage["completion_tokens"])
                            if not block.data and block.usage is None and not block.done:
                                continue  # (a block with the end marker alone still says the answer is whole)
                            if not yielded and attempt is not None:
                                attempt.add_event("first_token")
                            yielded = True
                            yield block
                        if done:
                            outcome = Outcome.OK
                        else:
                            error = self._unavailable(f"the stream from {worker.url} ended before the completion finished")
            except (GeneratorExit, asyncio.CancelledError):
                outcome = Outcome.OK  # the client left; the worker did nothing wrong
                started = float("inf")
                raise
            except (WorkerRefusedError, WorkerBrokenError) as exc:
                outcome = _refused_or_error(exc) if not yielded else Outcome.ERROR
                lost = True
                error = self._unavailable(f"{worker.url}: the stream broke: {exc}")
            except WorkerTimeoutError as exc:
                error = self._unavailable(f"{worker.url} sent no data for {self._read_timeout:.0f} s ({exc})")
            except WorkerError as exc:
                error = self._unavailable(f"{worker.url}: the stream broke: {exc}")
            except json.JSONDecodeError as exc:
                error = self._unavailable(f"{worker.url} sent a usage event that is not JSON: {exc}")
            except WorkerEventError as exc:
                error = _upstream_error(500, exc.payload, self.model_id)  # the worker failed after it answered 200
            finally:
                telemetry.end_span(attempt, error=error)
                elapsed = time.perf_counter() - started if outcome is Outcome.OK else 0.0
                self.pool.end(worker, outcome, seconds=max(0.0, elapsed), tokens=tokens, adapter=adapter)
                if budgeted:
                    self.pool.end_retry()
            if error is None:
                return
            tried.append(worker)
            if fatal or yielded:
                raise error
            budgeted = self._may_retry(tried, lost=lost)
            if budgeted is None:
                raise error
            logger.info("retrying a %s request on another worker after %s: %s", self.model_id, worker.url, error.message)


def _request_headers(attempt: Any = None) -> dict[str, str] | None:
    # The gateway's request id travels on, so the worker's logs name the same request; with
    # tracing on, so does the attempt's span (W3C traceparent), so the worker's spans join the trace.
    rid = request_id.current.get()
    headers = {request_id.HEADER: rid} if rid else {}
    if attempt is not None:
        telemetry.inject(headers, attempt)
    return headers or None


def _attempt_span(worker: Worker, path: str, retried: bool) -> Any:
    """One CLIENT span per attempt on a worker (None when tracing is off)."""
    if not telemetry.enabled():
        return None
    return telemetry.start_span(
        "upstream", client=True, **{"server.address": worker.url, "url.path": path, "http.request.resend_count": int(retried)}
    )


def _refused_or_error(exc: WorkerError) -> Outcome:
    # Refused or reset before any answer: the process is gone (eject now); anything else
    # may be a blip and counts toward the consecutive-failure threshold.
    return Outcome.REFUSED if isinstance(exc, WorkerRefusedError | WorkerBrokenError) else Outcome.ERROR


def _summed(metric: re.Pattern[str], metrics_text: str) -> float | None:
    """A metric summed over its series in Prometheus text, or None when the worker does not export it."""
    values = [float(v) for v in metric.findall(metrics_text)]
    return sum(values) if values else None


def upstream_for_trtllm_artifact(
    artifact_dir: str | Path,
    base_url: str | Sequence[str],
    *,
    worker_artifact_dir: str | None = None,
    model_id: str | None = None,
    api_key: str | None = None,
    **pool: Any,
) -> UpstreamEngine:
    """An `UpstreamEngine` for workers running ``trtllm-serve`` from a TensorRT-LLM artifact.

    Args:
        artifact_dir: the artifact here (its checkpoint supplies the tokenizer).
        base_url: the worker, or the static pool of workers.
        worker_artifact_dir: where the workers mount the artifact; default: the same path.
        model_id: public name, for logs and errors.
        api_key: the workers' key, if they want one.
        pool: further `UpstreamEngine` options (discovery, health_interval, upstream_api, ...).

    Raises:
        NotFoundError: the artifact has no manifest (unfinished build).
        ArtifactIntegrityError: the artifact's files do not match the manifest.
    """
    from serving.artifacts.trtllm_config import CHECKPOINT_DIR
    from serving.artifacts.trtllm_manifest import load_trtllm_manifest

    local = Path(artifact_dir)
    manifest = load_trtllm_manifest(local)
    remote = (worker_artifact_dir or str(local)).rstrip("/")
    return UpstreamEngine(
        base_url,
        # trtllm-serve names the model after the MODEL argument it was started with.
        f"{remote}/{manifest.served_model_path}",
        api_key=api_key,
        tokenizer=local / CHECKPOINT_DIR,
        adapters={name: f"{remote}/{rel}" for name, rel in manifest.adapters.items()},
        adapter_mode="lora_request",
        model_id=model_id,
        **pool,
    )
