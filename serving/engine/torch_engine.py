"""The portable PyTorch engine: transformers model, batched decode with a KV cache.

One background thread owns the model. Requests that arrive within ``batch_window_ms`` of
each other are prefilled together (left-padded, with an attention mask) and then decoded
step by step with the KV cache; each request streams its own tokens back to its asyncio
queue via ``loop.call_soon_threadsafe`` and drops out of the batch when it finishes or its
consumer goes away. Requests that arrive mid-decode wait for the next batch (no
continuous batching: joining a running batch would mean merging left-padded KV caches of
different lengths, which transformers' caches do not support safely).

Multi-LoRA: with an ``adapters`` source the engine serves PEFT LoRA adapters on its base
weights. An adapter is loaded on first use (on the worker thread, between batches), rows
with different adapters share one batch through PEFT's per-row ``adapter_names``, and the
least recently used adapter is unloaded once more than ``max_loaded_adapters`` are loaded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError, MissingDependencyError, ModelNotFoundError
from serving.engine.base import Chunk, FinishReason, SamplingParams
from serving.engine.stop_tokens import stop_token_ids

logger = logging.getLogger(__name__)

_STOP = object()  # sentinel that tells the worker thread to exit
BASE_ADAPTER = "__base__"  # PEFT's per-row name for "no adapter"

AdapterSource = Callable[[str], Path] | Mapping[str, "str | Path"]
"""Where adapters come from: a mapping name -> PEFT folder, or a function that returns the
folder for a name and raises `ModelNotFoundError` for unknown ones (it may block: it is
called off the event loop)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: what waits, what runs, which adapters are loaded."""

    waiting: int
    running: int
    loaded_adapters: tuple[str, ...]


@dataclass(eq=False)
class _Request:
    """One request's state; decode fields are touched only by the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | BaseException]
    adapter: str | None = None  # public adapter name, None for the base weights
    adapter_path: Path | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: Any = None  # torch.Generator, created on the worker's device
    out_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # generated since the last chunk
    emitted: int = 0  # characters of text already delivered
    done: bool = False

    def deliver(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody will read this row any more.
            self.cancelled.set()


def _put_all(items: list[tuple[asyncio.Queue[Chunk | BaseException], Chunk]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _flush(outbox: list[tuple[_Request, Chunk]]) -> None:
    """Deliver one decode step's chunks with one wake-up per event loop, not one per row.

    Fewer cross-thread wake-ups mean less GIL contention with the decode thread.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Chunk]]] = {}
    for r, chunk in outbox:
        by_loop.setdefault(r.loop, []).append((r, chunk))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, [(r.queue, chunk) for r, chunk in items])
        except RuntimeError:
            for r, _ in items:
                r.cancelled.set()
    outbox.clear()


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin one of ``stops``."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TorchEngine:
    """Serve a transformers causal LM from a local folder, with request batching.

    Args:
        model_dir: a folder with config, safetensors weights and tokenizer (for example an
            artifact from `serving.build.torch_build.build_torch_artifact`).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        max_batch_size: most requests decoded together.
        batch_window_ms: how long the worker waits after the first request to gather more.
        model_id: name used in logs and errors; defaults to the folder name.
        num_threads: CPU only: torch intra-op threads for decoding. The default leaves one
            core free, because spinning OpenMP workers on every core starve the event loop
            thread that streams tokens (measured 5-7x slower decoding on 2 cores).
        adapters: PEFT LoRA adapters this engine may serve on its base weights (see
            `AdapterSource`); None serves the base only.
        max_loaded_adapters: most adapters kept loaded; the least recently used one is
            unloaded to make room. Also the most distinct adapters in one batch.
    """

    step_listener: Callable[[int], None] | None = None
    """Called on the worker thread with the number of rows of every decode step (metrics)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        max_batch_size: int = 16,
        batch_window_ms: float = 5.0,
        model_id: str | None = None,
        num_threads: int | None = None,
        adapters: AdapterSource | None = None,
        max_loaded_adapters: int = 8,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        if max_loaded_adapters <= 0:
            raise ValueError(f"max_loaded_adapters must be > 0, got {max_loaded_adapters}")
        self.model_dir = Path(model_dir)
        self.model_id = model_id or self.model_dir.name
        self.max_batch_size = max_batch_size
        self.batch_window_s = max(batch_window_ms, 0.0) / 1000.0
        self._device_spec = device
        self._num_threads_arg = num_threads
        self._num_threads: int | None = None
        self._ready = False
        self._stopping = False
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._eos_ids: set[int] = set()
        self._pad_id = 0
        self._max_context: int | None = None
        self._cache_kwarg = "past_key_values"
        self._forward_kwargs: dict[str, Any] = {}
        self._config: Any = None
        self._adapter_source = adapters
        self.max_loaded_adapters = max_loaded_adapters
        self._adapter_paths: dict[str, Path] = {}  # resolved once per public name
        # public name -> PEFT-internal name, in least-recently-used order (worker thread only).
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._loaded_paths: dict[str, Path] = {}
        self._adapter_seq = 0
        self._peft = False  # True once the base is wrapped in a PeftModel
        self._pending: deque[_Request] = deque()  # taken from the inbox, deferred to a later batch
        self._running = 0

    @property
    def ready(self) -> bool:
        """True once `start` finished and until `stop` begins."""
        return self._ready

    @property
    def serves_adapters(self) -> bool:
        """Whether requests may name an adapter."""
        return self._adapter_source is not None

    def stats(self) -> EngineStats:
        """What waits, what runs and which adapters are loaded, right now."""
        return EngineStats(
            waiting=self._inbox.qsize() + len(self._pending),
            running=self._running,
            loaded_adapters=tuple(self._loaded),
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer and weights (off the event loop) and start the worker thread."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name=f"forgeline-engine-{self.model_id}", daemon=True)
        self._thread.start()
        self._ready = True
        logger.info(
            "engine %s ready on %s (max_batch_size=%d, cpu threads=%s)",
            self.model_id,
            self._device,
            self.max_batch_size,
            self._num_threads,
        )

    async def stop(self) -> None:
        """Stop the worker; queued and in-flight requests end with an `unavailable` error."""
        if self._thread is None:
            return
        self._ready = False
        self._stopping = True
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        while self._pending:
            self._pending.popleft().deliver(self._unavailable())
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                item.deliver(self._unavailable())
        self._model = None
        self._peft = False
        self._loaded.clear()
        self._loaded_paths.clear()
        logger.info("engine %s stopped", self.model_id)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._device_spec == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self._device_spec)
        # bf16 matmuls are slow on most CPUs; on GPUs keep the dtype the artifact was saved in.
        dtype: Any = torch.float32 if device.type == "cpu" else "auto"
        logger.info("loading %s on %s", self.model_dir, device)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        model = model.to(device).eval()

        # The artifact's generation_config lists every turn-ending token (one source of truth).
        eos = set(stop_token_ids(model.generation_config, tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed `past_key_values` to `cache` (old name deprecated until 5.40).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._max_context = getattr(model.config, "max_position_embeddings", None)
        self._eos_ids = eos
        self._pad_id = int(pad) if pad is not None else 0
        if device.type == "cpu":
            cores = os.cpu_count() or 1
            self._num_threads = self._num_threads_arg or min(torch.get_num_threads(), max(1, cores - 1))
        self._device = device
        self._tokenizer = tokenizer
        self._config = model.config
        self._model = model

    # -- text helpers ------------------------------------------------------------------

    def _require_started(self) -> Any:
        if self._tokenizer is None or not self._ready:
            raise self._unavailable()
        return self._tokenizer

    def _unavailable(self) -> ForgelineError:
        return ForgelineError(f"engine for model `{self.model_id}` is not running", code=ErrorCode.UNAVAILABLE)

    def _encode(self, text: str) -> list[int]:
        tokenizer = self._require_started()
        # A rendered chat prompt usually carries the BOS text already; adding it again would
        # double it, so add special tokens only when the prompt does not start with BOS.
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the tokenizer's chat template, ready for the assistant turn.

        Raises:
            ForgelineError: ``invalid_request`` when the model has no chat template or the
                template rejects the messages (for example roles that do not alternate).
        """
        tokenizer = self._require_started()
        if not getattr(tokenizer, "chat_template", None):
            raise ForgelineError(
                f"model `{self.model_id}` has no chat template; use /v1/completions, "
                "or rebuild the engine artifact with a chat template",
                code=ErrorCode.INVALID_REQUEST,
                param="messages",
            )
        from jinja2 import TemplateError

        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError as exc:
            raise ForgelineError(
                f"the chat template rejected the messages: {exc}", code=ErrorCode.INVALID_REQUEST, param="messages"
            ) from exc

    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens `generate` feeds the model for ``text``."""
        return len(self._encode(text))

    # -- generation --------------------------------------------------------------------

    async def generate(
        self, prompt: str, params: SamplingParams, *, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream the completion of ``prompt``; the last chunk has a ``finish_reason``.

        Raises:
            ForgelineError: ``invalid_request`` for an empty or too long prompt,
                ``model_not_found`` for an adapter, ``unavailable`` when the engine is stopped.
        """
        adapter_path = await self._adapter_path(adapter) if adapter is not None else None
        prompt_ids = self._encode(prompt)
        if not prompt_ids:
            raise ForgelineError("the prompt is empty", code=ErrorCode.INVALID_REQUEST, param="prompt")
        limit = self._max_context
        if limit is not None and len(prompt_ids) + params.max_tokens > limit:
            raise ForgelineError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                code=ErrorCode.INVALID_REQUEST,
                param="max_tokens",
            )
        request = _Request(
            prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue(), adapter=adapter, adapter_path=adapter_path
        )
        self._inbox.put(request)
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Frees the batch row when the consumer stopped early (client disconnect).
            request.cancelled.set()

    async def _adapter_path(self, adapter: str) -> Path:
        known = self._adapter_paths.get(adapter)
        if known is not None:
            return known
        source = self._adapter_source
        if source is None:
            raise ModelNotFoundError(
                f"model `{self.model_id}` serves no adapters, so `{self.model_id}:{adapter}` does not exist",
                param="model",
            )
        if callable(source):
            path = Path(await asyncio.to_thread(source, adapter))
        elif adapter in source:
            path = Path(source[adapter])
        else:
            known_names = ", ".join(sorted(source)) or "none"
            raise ModelNotFoundError(
                f"model `{self.model_id}` has no adapter `{adapter}` (adapters: {known_names})", param="model"
            )
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"adapter `{adapter}` of `{self.model_id}` is not a PEFT adapter folder: "
                f"{path / 'adapter_config.json'} is missing",
                param="model",
            )
        self._adapter_paths[adapter] = path
        return path

    # -- worker thread -----------------------------------------------------------------

    def _next_request(self, timeout: float | None) -> Any:
        """The next request: deferred ones first, then the inbox (raises `queue.Empty`)."""
        if self._pending:
            return self._pending.popleft()
        if timeout is None:
            return self._inbox.get()
        return self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """A batch starting with ``first``; True when the engine is stopping."""
        batch: list[_Request] = [first]
        adapters = {first.adapter} - {None}
        deferred: list[_Request] = []
        deadline = time.monotonic() + self.batch_window_s
        stopping = False
        while len(batch) < self.max_batch_size:
            try:
                # After the window closes, still take what is already queued.
                item = self._next_request(max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
                break
            if item.adapter is not None and item.adapter not in adapters:
                if len(adapters) >= self.max_loaded_adapters:
                    deferred.append(item)  # no room for another adapter in this batch
                    continue
                adapters.add(item.adapter)
            batch.append(item)
        # Keep arrival order for the deferred rows.
        self._pending.extendleft(reversed(deferred))
        return batch, stopping

    def _ensure_adapters(self, batch: list[_Request]) -> list[_Request]:
        """Load every adapter ``batch`` needs; rows whose adapter fails to load get the error."""
        wanted = {r.adapter: r.adapter_path for r in batch if r.adapter is not None}
        failed: dict[str, BaseException] = {}
        for name, path in wanted.items():
            assert path is not None
            try:
                self._load_adapter(name, path, keep=set(wanted))
            except Exception as exc:  # noqa: BLE001 - a bad adapter must not take the base down
                logger.exception("engine %s: loading adapter %s from %s failed", self.model_id, name, path)
                failed[name] = exc
        if not failed:
            return batch
        kept = []
        for r in batch:
            if r.adapter in failed:
                r.done = True
                r.deliver(
                    ForgelineError(
                        f"adapter `{r.adapter}` could not be loaded: {failed[r.adapter]}", code=ErrorCode.INTERNAL
                    )
                )
            else:
                kept.append(r)
        return kept

    def _load_adapter(self, name: str, path: Path, *, keep: set[str]) -> None:
        if name in self._loaded and self._loaded_paths.get(name) == path:
            self._loaded.move_to_end(name)
            return
        if name in self._loaded:  # same name, new folder (the adapter's alias moved)
            self._unload_adapter(name)
        while len(self._loaded) >= self.max_loaded_adapters:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break  # cannot happen: _gather caps distinct adapters per batch
            self._unload_adapter(victim)
        self._adapter_seq += 1
        internal = f"adapter{self._adapter_seq}"  # PEFT names become module keys: no dots
        if not self._peft:
            try:
                from peft import PeftModel
            except ImportError as exc:
                raise MissingDependencyError("serving LoRA adapters needs peft: pip install peft") from exc
            self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=internal).eval()
            self._peft = True
        else:
            self._model.load_adapter(str(path), adapter_name=internal)
            self._model.eval()
        self._loaded[name] = internal
        self._loaded_paths[name] = path
        logger.info("engine %s: loaded adapter %s from %s (%d loaded)", self.model_id, name, path, len(self._loaded))

    def _unload_adapter(self, name: str) -> None:
        internal = self._loaded.pop(name)
        self._loaded_paths.pop(name, None)
        self._model.delete_adapter(internal)
        logger.info("engine %s: unloaded adapter %s", self.model_id, name)

    def _worker(self) -> None:
        import torch

        if self._num_threads is not None:
            # Called on this thread because OpenMP thread counts are per calling thread.
            torch.set_num_threads(self._num_threads)
        while True:
            first = self._next_request(None)
            if first is _STOP:
                return
            batch, stopping = self._gather(first)
            if stopping:
                for r in batch:
                    r.deliver(self._unavailable())
                return
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    batch = self._ensure_adapters(batch)
                    if batch:
                        self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must survive to serve the next batch
                logger.exception("engine %s: batch of %d failed", self.model_id, len(batch))
                for r in batch:
                    if not r.done:
                        r.done = True
                        r.deliver(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))
            finally:
                self._running = 0

    def _forward(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, adapter_names: list[str] | None = None
    ) -> Any:
        extra: dict[str, Any] = {}
        if self._peft:
            # Always name every row's adapter once wrapped: without `adapter_names` PEFT would
            # apply its active adapter to every row, base-only rows included.
            extra["adapter_names"] = adapter_names or [BASE_ADAPTER] * input_ids.shape[0]
        out = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **self._forward_kwargs,
            **extra,
        )
        return out.logits[:, -1, :].float()

    def _run_batch(self, batch: list[_Request]) -> None:
        import torch
        from transformers import DynamicCache

        device = self._device
        for r in batch:
            if r.params.temperature > 0:
                r.generator = torch.Generator(device=device)
                if r.params.seed is None:
                    r.generator.seed()
                else:
                    r.generator.manual_seed(r.params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int; torch takes 64 bits

        # Left-pad so every row's last prompt token sits in the last column.
        lengths = [len(r.prompt_ids) for r in batch]
        width = max(lengths)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - lengths[i] :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention_mask[i, width - lengths[i] :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Positions count real tokens only, so padding does not shift a row's rotary phase.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = torch.tensor(lengths, dtype=torch.long, device=device)

        cache = DynamicCache(config=self._config)
        names = [self._loaded[r.adapter] if r.adapter is not None else BASE_ADAPTER for r in batch]
        self._running = len(batch)
        self._observe_step(len(batch))
        logits = self._forward(input_ids, attention_mask, position_ids, cache, names)
        rows = list(batch)
        outbox: list[tuple[_Request, Chunk]] = []
        while True:
            tokens = self._sample(logits, rows)
            keep = [i for i, (r, t) in enumerate(zip(rows, tokens, strict=True)) if not self._advance(r, t, outbox)]
            _flush(outbox)
            keep = [i for i in keep if not rows[i].cancelled.is_set()]
            if not keep:
                return
            if self._stopping:
                for i in keep:
                    rows[i].done = True
                    rows[i].deliver(self._unavailable())
                return
            if len(keep) < len(rows):
                # Finished or abandoned rows leave the batch: shrink the cache and masks.
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                attention_mask = attention_mask.index_select(0, index)
                next_pos = next_pos.index_select(0, index)
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
                names = [names[i] for i in keep]
                self._running = len(rows)
            step_ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            self._observe_step(len(rows))
            logits = self._forward(step_ids, attention_mask, next_pos.unsqueeze(1), cache, names)
            next_pos = next_pos + 1

    def _observe_step(self, rows: int) -> None:
        listener = self.step_listener
        if listener is not None:
            try:
                listener(rows)
            except Exception:  # noqa: BLE001 - metrics must never break decoding
                logger.debug("step listener failed", exc_info=True)

    def _sample(self, logits: Any, rows: list[_Request]) -> list[int]:
        import torch

        tokens: list[int] = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                choice = torch.multinomial(sorted_probs, 1, generator=r.generator)
                tokens[i] = int(order[choice].item())
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return tokens

    def _advance(self, r: _Request, token: int, outbox: list[tuple[_Request, Chunk]]) -> bool:
        """Record ``token`` for ``r``, queue any safe new text in ``outbox``; True when ``r`` finished."""
        r.out_ids.append(token)
        r.pending_ids.append(token)
        # Decode everything generated so far and emit the new suffix: byte-level BPE tokens
        # are not valid UTF-8 on their own, so per-token decoding would garble characters.
        text = self._tokenizer.decode(r.out_ids, skip_special_tokens=True)
        stops = r.params.stop
        reason: FinishReason | None = None
        end = len(text)
        if stops:
            hits = [i for i in (text.find(s, r.emitted) for s in stops) if i >= 0]
            if hits:
                reason, end = "stop", min(hits)
        if reason is None:
            if token in self._eos_ids or token in r.params.stop_token_ids:
                reason = "stop"
            elif len(r.out_ids) >= r.params.max_tokens:
                reason = "length"
            elif self._max_context is not None and len(r.prompt_ids) + len(r.out_ids) >= self._max_context:
                reason = "length"
        if reason is not None:
            r.done = True
            outbox.append((r, Chunk(text[r.emitted : max(end, r.emitted)], r.pending_ids, reason)))
            return True
        # Hold back an incomplete character and anything that may grow into a stop string.
        safe = len(text.rstrip("\ufffd"))
        if stops:
            safe -= _stop_holdback(text[:safe], stops)
        if safe > r.emitted:
            outbox.append((r, Chunk(text[r.emitted : safe], r.pending_ids)))
            r.pending_ids = []
            r.emitted = safe
        return False
