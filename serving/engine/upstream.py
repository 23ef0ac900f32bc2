"""An upstream OpenAI-compatible worker behind the `Engine` seam.

The gateway keeps doing what only it does (keys, quotas, aliases, chat templates, usage)
and relays generation to a worker over HTTP: ``trtllm-serve`` on H200s, any vLLM or
SGLang server, or ``forgeline worker`` (our PyTorch engine). Each request is one streamed
``POST /v1/completions``; chunks are relayed as they arrive, so time to first token is
the worker's. Health comes from the worker's ``/health``, polled in the background.

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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx

from registry.errors import ErrorCode, ForgelineError, ModelNotFoundError
from serving.engine.base import Chunk, FinishReason, SamplingParams
from serving.engine.stop_tokens import read_stop_token_ids

logger = logging.getLogger(__name__)

AdapterMode = Literal["lora_request", "model", "none"]

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
    """Generate through an OpenAI-compatible worker (``/v1/completions`` with streaming).

    Args:
        base_url: the worker, e.g. ``http://10.0.0.7:8000`` (no ``/v1``).
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
        health_interval: seconds between ``/health`` polls.
        metrics_path: the worker's metrics endpoint (``trtllm-serve``: ``/metrics`` has iteration
            stats as JSON; newer releases add Prometheus text at ``/prometheus/metrics``).
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
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
        health_interval: float = 5.0,
        metrics_path: str = "/metrics",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if adapter_mode not in ("lora_request", "model", "none"):
            raise ValueError(f"adapter_mode must be lora_request, model or none, got {adapter_mode!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = model_id or model
        self.adapter_mode: AdapterMode = adapter_mode
        self.adapter_model_template = adapter_model_template
        self.adapters = dict(adapters) if adapters is not None else None
        # lora_int_id must name the same adapter on every request: number them in a fixed order.
        self._lora_ids = {name: i for i, name in enumerate(sorted(self.adapters or {}))}
        self.metrics_path = metrics_path
        self._tokenizer_src = tokenizer if tokenizer is not None else (model if Path(model).is_dir() else None)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=connect_timeout)
        self._health_interval = health_interval
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: Any = None
        self._stop_token_ids: list[int] = []
        self._started = False
        self._healthy = False
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while started and the worker's last ``/health`` answered 200."""
        return self._started and self._healthy

    async def start(self) -> None:
        """Load the tokenizer, connect, probe ``/health`` once and keep polling it.

        A worker that is still loading does not stop the gateway: the model shows as not
        ready on ``/ready`` until its worker answers.

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
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, headers=self._headers, transport=self._transport)
        self._started = True
        self._healthy = await self.check_health()
        if not self._healthy:
            logger.warning("upstream worker %s for %s is not healthy yet", self.base_url, self.model_id)
        self._poller = asyncio.create_task(self._poll_health(), name=f"health-{self.model_id}")
        logger.info("upstream engine %s -> %s (%s)", self.model_id, self.base_url, self.model)

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
        """Whether the worker's ``/health`` answers 200 now."""
        if self._client is None:
            return False
        try:
            response = await self._client.get("/health", timeout=5.0)
        except httpx.HTTPError as exc:
            logger.debug("health of %s failed: %s", self.base_url, exc)
            return False
        return response.status_code == 200

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            healthy = await self.check_health()
            if healthy != self._healthy:
                logger.warning("upstream worker %s for %s is now %s", self.base_url, self.model_id, "healthy" if healthy else "DOWN")
            self._healthy = healthy

    async def scrape_metrics(self) -> str:
        """The worker's metrics endpoint, as text (Prometheus exposition or JSON, by worker)."""
        client = self._require_client()
        try:
            response = await client.get(self.metrics_path)
        except httpx.HTTPError as exc:
            raise self._unavailable(f"metrics scrape failed: {exc}") from exc
        if response.status_code != 200:
            raise _upstream_error(response.status_code, response.content, self.model_id)
        return response.text

    # -- text helpers ------------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None or not self._started:
            raise self._unavailable("engine is not running")
        return self._tokenizer

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise self._unavailable("engine is not running")
        return self._client

    def _unavailable(self, why: str) -> ForgelineError:
        return ForgelineError(f"upstream worker for model `{self.model_id}` is unavailable: {why}", code=ErrorCode.UNAVAILABLE)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's chat template, ready for the assistant turn."""
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
        """Stream the worker's completion of ``prompt``; the last chunk has a ``finish_reason``.

        Raises:
            ForgelineError: the worker's own error (same code: bad request, unknown model),
                or ``unavailable`` when it cannot be reached, stops answering for
                ``read_timeout`` seconds, or drops the stream before it finished.
        """
        client = self._require_client()
        body = self.request_body(prompt, params, adapter)
        texts: list[str] = []
        finish: FinishReason | None = None
        completion_tokens: int | None = None
        done = False
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise _upstream_error(response.status_code, await response.aread(), self.model_id)
                async for line in response.aiter_lines():
                    # After [DONE], read on to the end of the body instead of breaking out:
                    # httpx closes a connection whose response was not read to the end, so
                    # breaking made every request open a new TCP connection to the worker.
                    if done or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if event.get("error"):
                        # The worker failed after it answered 200: it reports in-band.
                        raise _upstream_error(500, data, self.model_id)
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
        except httpx.TimeoutException as exc:
            raise self._unavailable(f"no data for {self._timeout.read:.0f} s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise self._unavailable(f"the stream broke: {type(exc).__name__}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise self._unavailable(f"the worker sent an event that is not JSON: {exc}") from exc
        if finish is None or not done:
            raise self._unavailable("the stream ended before the completion finished")
        tail = texts[-1] if texts else ""
        if completion_tokens is None:
            # The worker did not report usage: count the text ourselves.
            completion_tokens = len(self._require_tokenizer()("".join(texts), add_special_tokens=False)["input_ids"])
        yield Chunk(text=tail, token_ids=[UNKNOWN_TOKEN_ID] * completion_tokens, finish_reason=finish)


def upstream_for_trtllm_artifact(
    artifact_dir: str | Path,
    base_url: str,
    *,
    worker_artifact_dir: str | None = None,
    model_id: str | None = None,
    api_key: str | None = None,
) -> UpstreamEngine:
    """An `UpstreamEngine` for a worker running ``trtllm-serve`` from a TensorRT-LLM artifact.

    Args:
        artifact_dir: the artifact here (its checkpoint supplies the tokenizer).
        base_url: the worker.
        worker_artifact_dir: where the worker mounts the artifact; default: the same path.
        model_id: public name, for logs and errors.
        api_key: the worker's key, if it wants one.

    Raises:
        NotFoundError: the artifact has no manifest (unfinished build).
        ArtifactIntegrityError: the artifact's files do not match the manifest.
    """
    from serving.build.trtllm_config import CHECKPOINT_DIR
    from serving.build.trtllm_manifest import load_trtllm_manifest

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
    )
