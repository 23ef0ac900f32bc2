"""One generation request's trip: permission, routing, quota, engine, accounting.

Chat and completions differ only in how they build the prompt and shape the answer;
everything else lives here so both count usage, time tokens, charge quotas, report to a
canary and release their hold on the model the same way, streamed or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request

from registry.errors import ForgelineError
from registry.keys import KeyRecord
from serving import telemetry
from serving.engine.base import ChatRelay, Chunk, Engine, RelayedAnswer, SamplingParams, TokenLogprobs
from serving.engine.sse_relay import SseBlock
from serving.engine.upstream import UpstreamEngine
from serving.gateway.auth import check_model_allowed, may_route
from serving.gateway.catalog import Lease, ModelCatalog, Route, ServedModel, model_not_found
from serving.gateway.generation import Completion, interleave, lineage_headers, open_streams
from serving.gateway.metrics import GatewayMetrics, observe_many
from serving.gateway.protocol import FinishReason
from serving.gateway.quota import Limiter, Limits, QuotaState

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; not a server failure
_background: set[asyncio.Task[Any]] = set()


async def _chunks_only(pairs: AsyncGenerator[tuple[int, Chunk], None]) -> AsyncGenerator[Chunk, None]:
    """The chunks of a one-choice stream, without their index."""
    try:
        async for _, chunk in pairs:
            yield chunk
    finally:
        await pairs.aclose()


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, ForgelineError):
        return exc.http_status
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return CLIENT_CLOSED
    return 500


class RequestLifecycle:
    """Holds the routed model for one request and accounts for it exactly once.

    Create it with `begin`; call `admit` once the prompt is known, then `complete` or
    `stream`. Whatever happens, `finish` runs once: it releases the model (so a hot swap
    can drain), records metrics and the access-log fields, charges completion tokens to
    the key's quota and tells a canary how the request went.
    """

    def __init__(self, request: Request, model: str, principal: KeyRecord | None, lease: Lease) -> None:
        self.request = request
        self.model = model
        self.principal = principal
        self.lease = lease
        self.started = time.perf_counter()
        self.prompt_tokens = 0
        self._admitted_tokens = 0
        self._quota: QuotaState | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self._finished = False
        state = request.app.state
        self._metrics: GatewayMetrics = state.metrics
        self._limiter: Limiter | None = state.limiter
        served = lease.served
        self._labels = (served.model, served.version, lease.adapter or "")
        # ``request.state``'s own dict, read directly: the `State` wrapper costs several calls a read.
        request_state = request.scope.setdefault("state", {})
        access = request_state.get("access")
        self._access: dict[str, Any] = access if access is not None else {}
        # The access-log middleware calls these when the exchange ends, however it ends: a
        # stream the client abandoned before it began still releases the model.
        closers = request_state.get("on_close")
        if closers is not None:
            closers.append(lambda: self.finish(CLIENT_CLOSED))
        self._access.update(
            model=model, served=f"{served.name}/{served.version}", adapter=lease.adapter, canary=lease.canary or None
        )

    @classmethod
    async def begin(cls, request: Request, model: str, principal: KeyRecord | None) -> RequestLifecycle:
        """Check the key may use ``model``, route it and hold the served model.

        Raises:
            PermissionDeniedError: the key's model pattern does not cover ``model`` (403).
            ModelNotFoundError: nothing serves ``model`` (404).
        """
        check_model_allowed(principal, model)
        catalog: ModelCatalog = request.app.state.catalog
        await catalog.prepare(model)
        lease = catalog.acquire(model)
        # Another organisation's model or adapter (``name`` or ``base:name``), or an adapter of a
        # model outside the key's pattern, does not exist for this key.
        route = Route(lease.served, lease.adapter, lease.adapter_org, lease.adapter_model)
        if not may_route(principal, route):
            lease.release()
            raise model_not_found(model)
        return cls(request, model, principal, lease)

    @property
    def served(self) -> ServedModel:
        return self.lease.served

    @property
    def engine(self) -> Engine:
        return self.lease.served.engine

    @property
    def adapter(self) -> str | None:
        return self.lease.adapter

    @property
    def headers(self) -> dict[str, str]:
        """Lineage headers naming the exact version, artifact and adapter that answer, and the key's quota."""
        headers = lineage_headers(self.served, self.adapter)
        if self._quota is not None:
            headers.update(self._quota.headers())
        return headers

    @property
    def _key(self) -> str:
        return self.principal.id if self.principal is not None else ""

    @property
    def _limits(self) -> Limits:
        p = self.principal
        return Limits(rpm=p.rpm, tpm=p.tpm) if p is not None else Limits()

    async def admit(self, prompt_tokens: int) -> None:
        """Charge one request and the prompt tokens to the key's quota; 429 when over it."""
        self.prompt_tokens = self._admitted_tokens = prompt_tokens
        if self._limiter is not None and self.principal is not None:
            with telemetry.span("gateway.quota", **{"gen_ai.usage.input_tokens": prompt_tokens}):
                self._quota = await self._limiter.admit(self.principal.id, self._limits, prompt_tokens)

    async def complete(self, prompt: str, params: SamplingParams) -> Completion:
        """Generate to the end (non-streaming) and account for it."""
        return (await self.complete_choices(prompt, [params]))[0]

    async def complete_choices(self, prompt: str, params: list[SamplingParams]) -> list[Completion]:
        """Generate one choice per entry of ``params`` to the end; usage sums them all."""
        engine = self.engine
        if isinstance(engine, UpstreamEngine) and all(p.logprobs is None for p in params):
            return await self._complete_upstream(engine, prompt, params)
        parts: list[list[str]] = [[] for _ in params]
        tokens = [0] * len(params)
        finish: list[FinishReason] = ["length"] * len(params)
        logprobs: list[list[TokenLogprobs]] = [[] for _ in params]
        async for index, chunk in await self.stream_choices(prompt, params):
            parts[index].append(chunk.text)
            tokens[index] += len(chunk.token_ids)
            logprobs[index] += chunk.logprobs or []
            if chunk.finish_reason is not None:
                finish[index] = chunk.finish_reason
        return [
            Completion("".join(text), n, end, lp if p.logprobs is not None else None)
            for text, n, end, lp, p in zip(parts, tokens, finish, logprobs, params, strict=True)
        ]

    async def _complete_upstream(self, engine: UpstreamEngine, prompt: str, params: list[SamplingParams]) -> list[Completion]:
        # Non-streamed from the worker too: one answer to parse instead of an event per token, and
        # a worker that dies mid-answer is retried on another (the client has seen nothing yet).
        # No time to first token or inter-token latency is observed: a whole answer has neither.
        status = 200
        try:
            with telemetry.span("gateway.queue", current=False, **{"gen_ai.request.model": self.model}):
                tasks = [asyncio.ensure_future(engine.complete(prompt, p, adapter=self.adapter)) for p in params]
                try:
                    done = await asyncio.gather(*tasks)
                finally:
                    for task in tasks:  # one choice failed (or the client left): the others are not wanted
                        task.cancel()
            self.completion_tokens = sum(tokens for _, tokens, _ in done)
            return [Completion(text, tokens, finish) for text, tokens, finish in done]
        except BaseException as exc:
            status = _status_of(exc)
            raise
        finally:
            self.finish(status)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        """Start generating; errors before the first chunk raise here (proper HTTP errors)."""
        return _chunks_only(await self.stream_choices(prompt, [params]))

    async def stream_choices(
        self, prompt: str, params: list[SamplingParams]
    ) -> AsyncGenerator[tuple[int, Chunk], None]:
        """Start one generation per choice (batched together); ``(index, chunk)`` interleaved by index.

        Errors before any choice's first chunk raise here (proper HTTP errors).
        """
        # Queueing and prefill, wherever the engine does them: until every choice's first output.
        with telemetry.span("gateway.queue", current=False, **{"gen_ai.request.model": self.model}):
            streams = await open_streams(self.served, prompt, params, self.adapter)
        return self._timed(interleave(streams))

    async def _timed(
        self, chunks: AsyncGenerator[tuple[int, Chunk], None]
    ) -> AsyncGenerator[tuple[int, Chunk], None]:
        last: dict[int, float] = {}  # per choice: choices decode side by side, not one after another
        status = 200
        try:
            async for index, chunk in chunks:
                now = time.perf_counter()
                n = len(chunk.token_ids)
                if n:
                    if self.first_token_at is None:
                        self.first_token_at = now
                        self._metrics.ttft_by[self._labels].observe(now - self.started)
                        telemetry.event("first_token")
                    if index not in last:
                        # A first chunk of several tokens: the rest arrived with it.
                        n_gaps, gap = n - 1, 0.0
                    else:
                        n_gaps, gap = n, (now - last[index]) / n
                    observe_many(self._metrics.itl_by[self._labels], gap, n_gaps)
                    last[index] = now
                    self.completion_tokens += n
                yield index, chunk
        except BaseException as exc:
            status = _status_of(exc)
            raise
        finally:
            await chunks.aclose()
            self.finish(status)

    # -- pass-through chat: the worker's answer is relayed, its ``usage`` counted ----------

    async def relay(self, body: dict[str, Any]) -> RelayedAnswer:
        """Send a non-streamed chat request whole to the served model's workers; account for it."""
        relay = self._relay()
        answer = await relay.relay_chat(body, adapter=self.adapter)
        self._count_usage(answer.json.get("usage"))
        self.finish(200)
        return answer

    async def relay_stream(self, body: dict[str, Any], *, include_usage: bool = False) -> AsyncGenerator[SseBlock, None]:
        """Start a streamed pass-through chat request; errors before its first event raise here.

        The worker's events come as it sent them (see `ChatRelay.relay_chat_stream`).
        """
        blocks = self._relay().relay_chat_stream(body, adapter=self.adapter, include_usage=include_usage)
        try:
            with telemetry.span("gateway.queue", current=False, **{"gen_ai.request.model": self.model}):
                first = await anext(blocks)
        except BaseException:
            await blocks.aclose()
            raise
        return self._relayed(first, blocks)

    def _relay(self) -> ChatRelay:
        relay = self.served.chat_relay
        if relay is None:
            raise RuntimeError(f"{self.served.name} has no chat relay")  # chat.py checks first
        return relay

    def _count_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def _relayed(self, first: SseBlock, blocks: AsyncGenerator[SseBlock, None]) -> AsyncGenerator[SseBlock, None]:
        status = 200
        last = self.started
        itl = self._metrics.itl_by[self._labels]
        try:
            block: SseBlock | None = first
            while block is not None:
                if block.usage:
                    self._count_usage(block.usage)
                outputs = block.outputs()
                if outputs:
                    now = time.perf_counter()
                    if self.first_token_at is None:
                        self.first_token_at = now
                        self._metrics.ttft_by[self._labels].observe(now - self.started)
                        telemetry.event("first_token")
                        # Output events that arrived with the first one add no gaps of their own.
                        outputs, gap = outputs - 1, 0.0
                    else:
                        gap = (now - last) / outputs
                    observe_many(itl, gap, outputs)
                    last = now
                if block.done:
                    # The answer is whole: accounted for now, so the access-log line written with the
                    # client's last bytes has it (the worker's body is read to its end after them).
                    self.finish(200)
                yield block
                block = await anext(blocks, None)
        except BaseException as exc:
            status = _status_of(exc)
            raise
        finally:
            await blocks.aclose()
            self.finish(status)

    def fail(self, exc: BaseException) -> None:
        """Account for a request that failed before its stream began."""
        self.finish(_status_of(exc))

    def finish(self, status: int) -> None:
        """Release the model and record the outcome (idempotent)."""
        if self._finished:
            return
        self._finished = True
        elapsed = time.perf_counter() - self.started
        # Only server failures count against a canary; client errors (4xx, 429, a client that
        # left) say nothing about the version that would have answered.
        failed = True if status >= 500 else (False if status < 400 else None)
        self.lease.release(failed=failed, latency_s=elapsed)
        m = self._metrics
        answered = status < 400 or status == CLIENT_CLOSED
        m.count(self._labels, self._key, status, self.prompt_tokens, self.completion_tokens, tokens=answered)
        if answered:
            m.e2e_by[self._labels].observe(elapsed)
            # Prompt tokens beyond those admitted up front: a pass-through request learns its
            # prompt size from the worker's usage.
            owed = self.completion_tokens + max(0, self.prompt_tokens - self._admitted_tokens)
            # Only a tpm bucket takes tokens: for a key without one, no task is scheduled.
            if self._limiter is not None and self.principal is not None and owed and self.principal.tpm is not None:
                self._charge(owed)
        self._access.update(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttft_ms=round((self.first_token_at - self.started) * 1000, 1) if self.first_token_at else None,
            outcome=status,
        )

    def _charge(self, tokens: int) -> None:
        limiter, key, limits = self._limiter, self._key, self._limits
        assert limiter is not None

        async def charge() -> None:
            try:
                await limiter.charge(key, limits, tokens)
            except Exception:  # noqa: BLE001 - a quota store hiccup must not fail a finished request
                logger.warning("could not charge %d completion tokens to key %s", tokens, key, exc_info=True)

        # Scheduled, not awaited: finish() also runs while a stream is being closed.
        task = asyncio.get_running_loop().create_task(charge())
        _background.add(task)
        task.add_done_callback(_background.discard)
