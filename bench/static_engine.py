"""The static-batching PyTorch engine as it was before continuous batching (issue 16), for `bench/` only.

Kept verbatim so `bench/open_loop.py` can measure the new engine against it in the same run;
nothing in `serving/` imports it.

One background thread owns the model. Requests that arrive within ``batch_window_ms`` of
each other are prefilled together (left-padded, with an attention mask) and then decoded
step by step with the KV cache; each request streams its own tokens back to its asyncio
queue via ``loop.call_soon_threadsafe`` and drops out of the batch when it finishes or its
consumer goes away. Requests that arrive mid-decode wait for the next batch (no
continuous batching: joining a running batch would mean merging left-padded KV caches of
different lengths, which transformers' caches do not support safely).

Multi-LoRA: with an ``adapters`` source the engine serves PEFT LoRA adapters on its base
weights. An adapter is loaded on first use (on the worker thread, between batches), rows
with different adapters share one batch (`LoraRouter` names each row's adapter, also on
mixture-of-experts blocks that flatten rows into tokens), and the least recently used
adapter is unloaded once more than ``max_loaded_adapters`` are loaded. An adapter PEFT
cannot batch per row (LoRA on fused MoE experts, DoRA) runs in batches of its own.

Failure isolation: a batch that fails before it produced a token is retried row by row,
so one bad request (or adapter) fails alone, and the adapter state is reset after every
batch, so nothing a failed batch did reaches the next one.
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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import ConflictError, ErrorCode, ForgelineError, MissingDependencyError, ModelNotFoundError
from serving.cpu_pool import run_cpu
from serving.engine.adapter_chat import BASE_CHAT, AdapterChat, read_adapter_chat
from serving.engine.base import Chunk, FinishReason, Logprob, SamplingParams, TokenGuide, TokenLogprobs
from serving.engine.lora_routing import BASE_ADAPTER, LoraRouter, strip_lora
from serving.engine.token_bytes import TokenBytes
from serving.stop_tokens import stop_token_ids

logger = logging.getLogger(__name__)

_STOP = object()  # sentinel that tells the worker thread to exit
__all__ = ["StaticTorchEngine"]

AdapterSource = Callable[[str], Path] | Mapping[str, "str | Path"]
"""Where adapters come from: a mapping name -> PEFT folder, or a function that returns the
folder for a name and raises `ModelNotFoundError` for unknown ones (it may block: it is
called off the event loop)."""


_LOAD_LOCK = threading.Lock()
"""Serialises model loading in this process (see `TorchEngine._load`)."""


def _max_prompt_chars(tokenizer: Any, max_context: int | None) -> int | None:
    """Characters beyond which a prompt cannot fit ``max_context`` tokens, or None when unknown.

    No token covers more characters than its vocabulary string has (byte-level tokens have
    one symbol per byte, every character is at least one byte), so a prompt longer than
    ``max_context`` times the longest one needs more tokens than fit. Only sound when the
    tokenizer has no normalizer (which could shrink the text first, e.g. by stripping accents).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if max_context is None or backend is None or backend.normalizer is not None:
        return None
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(t) for t in tokens if t), default=0)
    return max_context * longest if longest else None


def check_loading_info(source: str, info: Mapping[str, Any]) -> None:
    """Refuse weights that loaded incompletely (transformers only warns, then serves random weights).

    Args:
        source: the folder loaded, for the message.
        info: ``from_pretrained(..., output_loading_info=True)``'s second value.

    Raises:
        ForgelineError: ``unavailable`` naming the missing, unexpected or mismatched weights.
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = [str(k) for k in (info.get(kind) or ())]
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ForgelineError(
            f"the weights in {source} loaded incompletely ({'; '.join(problems)}); refusing to serve a partly "
            "random model; fix: rebuild the engine artifact (`forgeline build`) and check it matches its config",
            code=ErrorCode.UNAVAILABLE,
        )


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
    stop_ids: frozenset[int] = frozenset()  # the adapter's end-of-turn tokens, besides the base's
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: Any = None  # torch.Generator, created on the worker's device
    guide: TokenGuide | None = None  # this sequence's own constraint, from params.guide
    out_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # generated since the last chunk
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per pending id, when asked
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


class StaticTorchEngine:
    """Serve a transformers causal LM from a local folder, with request batching.

    Args:
        model_dir: a folder with config, safetensors weights and tokenizer (for example an
            artifact from `serving.artifacts.torch_build.build_torch_artifact`).
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

    reports_logprobs = True  # from the decode step, see `_sample`

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
        self._token_bytes: TokenBytes | None = None
        self._device: Any = None
        self._eos_ids: set[int] = set()
        self._pad_id = 0
        self._max_context: int | None = None
        self._max_prompt_chars: int | None = None
        self._cache_kwarg = "past_key_values"
        self._forward_kwargs: dict[str, Any] = {}
        self._config: Any = None
        self._adapter_source = adapters
        self.max_loaded_adapters = max_loaded_adapters
        self._adapter_paths: dict[str, Path] = {}  # resolved once per public name
        self._adapter_chats: dict[str, AdapterChat] = {}  # each adapter's own chat conventions
        # public name -> PEFT-internal name, in least-recently-used order (worker thread only).
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._loaded_paths: dict[str, Path] = {}
        self._adapter_seq = 0
        self._peft = False  # True once the base is wrapped in a PeftModel
        self._router: LoraRouter | None = None
        # public name -> why it cannot share a batch with other adapters (see LoraRouter).
        self._exclusive: dict[str, str] = {}
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
        self._router = None
        self._exclusive.clear()
        self._loaded.clear()
        self._loaded_paths.clear()
        logger.info("engine %s stopped", self.model_id)

    def _load(self) -> None:
        # One load at a time per process, the first imports included: transformers' lazy
        # module import is not thread-safe (a second thread got "cannot import name
        # AutoModelForCausalLM"), and loading patches process-wide state (weight-init
        # functions, default device), so `serve --base a --base b` failed at start-up or
        # kept randomly initialised weights.
        with _LOAD_LOCK:
            self._load_serially()

    def _load_serially(self) -> None:
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
        loaded: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, output_loading_info=True)
        model, info = loaded
        check_loading_info(str(self.model_dir), info)
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
        self._token_bytes = TokenBytes(tokenizer)
        self._max_prompt_chars = _max_prompt_chars(tokenizer, self._max_context)
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
        if self._max_prompt_chars is not None and len(text) > self._max_prompt_chars:
            # Far too long to fit however it tokenizes: say so without spending seconds tokenizing it.
            raise ForgelineError(
                f"This model's maximum context length is {self._max_context} tokens, and a prompt of {len(text)} "
                f"characters is longer than that whatever its text (at most {self._max_prompt_chars} characters "
                "can fit). Reduce the prompt.",
                code=ErrorCode.INVALID_REQUEST,
                param="messages",
            )
        # A rendered chat prompt usually carries the BOS text already; adding it again would
        # double it, so add special tokens only when the prompt does not start with BOS.
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]], *, adapter: str | None = None) -> str:
        """Render chat messages with the chat template, ready for the assistant turn.

        An adapter trained with its own chat template (saved with its tokenizer files) is
        rendered with that one; otherwise the base's template applies. Resolving an adapter
        the engine has not seen yet reads its folder (and maybe the registry): call it off
        the event loop for a new adapter name.

        Raises:
            ForgelineError: ``invalid_request`` when there is no chat template or the
                template rejects the messages (for example roles that do not alternate);
                ``model_not_found`` / ``conflict`` for an adapter that does not exist or
                cannot be served on this base.
        """
        tokenizer = self._require_started()
        own = self._resolve_adapter(adapter)[1].chat_template if adapter is not None else None
        if own is None and not getattr(tokenizer, "chat_template", None):
            raise ForgelineError(
                f"model `{self.model_id}` has no chat template; use /v1/completions, "
                "or rebuild the engine artifact with a chat template",
                code=ErrorCode.INVALID_REQUEST,
                param="messages",
            )
        from jinja2 import TemplateError

        try:
            return str(
                tokenizer.apply_chat_template(messages, chat_template=own, tokenize=False, add_generation_prompt=True)
            )
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
        adapter_path, chat = await self._adapter_path(adapter) if adapter is not None else (None, BASE_CHAT)
        prompt_ids = await run_cpu(len(prompt), self._encode, prompt)
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
            prompt_ids,
            params,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            adapter=adapter,
            adapter_path=adapter_path,
            stop_ids=chat.stop_ids,
            guide=params.guide() if params.guide is not None else None,
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

    async def _adapter_path(self, adapter: str) -> tuple[Path, AdapterChat]:
        known = self._adapter_paths.get(adapter)
        if known is not None:
            return known, self._adapter_chats[adapter]
        # The source may ask the registry and the adapter's tokenizer is read from disk.
        return await asyncio.to_thread(self._resolve_adapter, adapter)

    def _resolve_adapter(self, adapter: str) -> tuple[Path, AdapterChat]:
        """The adapter's folder and chat conventions, looked up once per name (may block)."""
        known = self._adapter_paths.get(adapter)
        if known is not None:
            return known, self._adapter_chats[adapter]
        source = self._adapter_source
        if source is None:
            raise ModelNotFoundError(
                f"model `{self.model_id}` serves no adapters, so `{self.model_id}:{adapter}` does not exist",
                param="model",
            )
        if callable(source):
            path = Path(source(adapter))
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
        chat = read_adapter_chat(adapter, path, self._require_started(), model_id=self.model_id)
        self._adapter_chats[adapter] = chat
        self._adapter_paths[adapter] = path
        return path, chat

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
        lead_exclusive = first.adapter in self._exclusive
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
            if not self._fits(item, first.adapter, lead_exclusive):
                deferred.append(item)  # an exclusive adapter's rows ride alone
                continue
            if item.adapter is not None and item.adapter not in adapters:
                if len(adapters) >= self.max_loaded_adapters:
                    deferred.append(item)  # no room for another adapter in this batch
                    continue
                adapters.add(item.adapter)
            batch.append(item)
        # Keep arrival order for the deferred rows.
        self._pending.extendleft(reversed(deferred))
        return batch, stopping

    def _fits(self, item: _Request, lead: str | None, lead_exclusive: bool) -> bool:
        """Whether ``item`` may join a batch led by adapter ``lead`` (None: the base)."""
        if lead_exclusive:
            return item.adapter == lead
        return item.adapter not in self._exclusive

    def _ensure_adapters(self, batch: list[_Request]) -> list[_Request]:
        """Load every adapter ``batch`` needs; rows whose adapter fails to load get the error.

        Rows that turn out not to fit the batch (their adapter proved exclusive on loading)
        go back to the front of the queue for a later batch.
        """
        wanted = {r.adapter: r.adapter_path for r in batch if r.adapter is not None}
        failed: dict[str, BaseException] = {}
        for name, path in wanted.items():
            assert path is not None
            try:
                self._load_adapter(name, path, keep=set(wanted))
            except ForgelineError as exc:
                failed[name] = exc
            except Exception as exc:  # noqa: BLE001 - a bad adapter must not take the base down
                logger.exception("engine %s: loading adapter %s from %s failed", self.model_id, name, path)
                failed[name] = ConflictError(
                    f"adapter `{name}` cannot be served on `{self.model_id}`: loading it failed: {exc}", param="model"
                )
        kept = []
        for r in batch:
            if r.adapter in failed:
                r.done = True
                r.deliver(failed[r.adapter])
            else:
                kept.append(r)
        if not kept:
            return kept
        lead = kept[0].adapter
        lead_exclusive = lead in self._exclusive
        fits = [r for r in kept if self._fits(r, lead, lead_exclusive)]
        later = [r for r in kept if not self._fits(r, lead, lead_exclusive)]
        self._pending.extendleft(reversed(later))
        return fits

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
        with _LOAD_LOCK:  # engines share the process: adapter loads race like base loads (see `_load`)
            if not self._peft:
                try:
                    from peft import PeftModel
                except ImportError as exc:
                    raise MissingDependencyError("serving LoRA adapters needs peft: pip install peft") from exc
                try:
                    self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=internal).eval()
                except Exception:
                    # PEFT injects its layers into the base in place before it loads the weights:
                    # take them out again, or the base would answer with a half-loaded adapter.
                    strip_lora(self._model)
                    raise
                self._peft = True
                self._router = LoraRouter(self._model)
            else:
                try:
                    self._model.load_adapter(str(path), adapter_name=internal)
                except Exception:
                    self._forget_internal(internal)
                    raise
                self._model.eval()
        assert self._router is not None
        self._router.refresh()
        self._loaded[name] = internal
        self._loaded_paths[name] = path
        reason = self._router.exclusive_reason(internal)
        if reason is not None:
            self._exclusive[name] = reason
            logger.info("engine %s: adapter %s runs in batches of its own: %s", self.model_id, name, reason)
        logger.info("engine %s: loaded adapter %s from %s (%d loaded)", self.model_id, name, path, len(self._loaded))

    def _forget_internal(self, internal: str) -> None:
        """Remove what a failed load left of PEFT adapter ``internal`` (best effort)."""
        try:
            self._model.delete_adapter(internal)
        except Exception:  # noqa: BLE001 - nothing of it may have been created
            logger.debug("nothing to clean up for adapter %s", internal, exc_info=True)
        if self._router is not None:
            self._router.refresh()

    def _unload_adapter(self, name: str) -> None:
        internal = self._loaded.pop(name)
        self._loaded_paths.pop(name, None)
        self._exclusive.pop(name, None)
        self._model.delete_adapter(internal)
        if self._router is not None:
            self._router.refresh()
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
                self._isolate(batch, exc)
            finally:
                self._running = 0

    def _isolate(self, batch: list[_Request], exc: BaseException) -> None:
        """After ``batch`` failed: retry alone each row that has not streamed yet, fail the rest.

        One bad row (a prompt, an adapter) must not fail the rows it happened to share a
        batch with; a row that fails alone gets the error. PEFT's adapter state needs no
        repair: `LoraRouter.batch` resets it however a batch ends.
        """
        import torch

        retry = [r for r in batch if not r.done and not r.out_ids and not r.cancelled.is_set()]
        for r in batch:
            if not r.done and r not in retry:
                r.done = True
                r.deliver(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))
        if len(batch) == 1:
            for r in retry:
                self._fail_alone(r, exc)
            return
        for r in retry:
            if self._stopping:
                r.done = True
                r.deliver(self._unavailable())
                continue
            try:
                with torch.inference_mode():
                    self._run_batch([r])
            except Exception as solo_exc:  # noqa: BLE001 - this row alone fails
                logger.exception("engine %s: request failed on its own", self.model_id)
                self._fail_alone(r, solo_exc)

    def _fail_alone(self, r: _Request, exc: BaseException) -> None:
        if not r.done:
            r.done = True
            r.deliver(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))

    def _forward(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, adapter_names: list[str] | None = None
    ) -> Any:
        if self._router is not None:
            # Always name every row's adapter once wrapped: unnamed rows would get PEFT's
            # active adapter, base-only rows included.
            self._router.route(adapter_names or [BASE_ADAPTER] * input_ids.shape[0], input_ids.shape[1])
        out = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **self._forward_kwargs,
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
        exclusive = names[0] if batch[0].adapter in self._exclusive else None
        with self._adapter_state(exclusive):
            self._decode(batch, input_ids, attention_mask, position_ids, next_pos, cache, names)

    def _adapter_state(self, exclusive: str | None) -> AbstractContextManager[None]:
        return self._router.batch(exclusive) if self._router is not None else nullcontext()

    def _decode(
        self,
        batch: list[_Request],
        input_ids: Any,
        attention_mask: Any,
        position_ids: Any,
        next_pos: Any,
        cache: Any,
        names: list[str],
    ) -> None:
        import torch

        device = self._device
        self._running = len(batch)
        self._observe_step(len(batch))
        logits = self._forward(input_ids, attention_mask, position_ids, cache, names)
        rows = list(batch)
        outbox: list[tuple[_Request, Chunk]] = []
        while True:
            tokens, reports = self._sample(logits, rows)
            keep = [
                i
                for i, (r, t, lp) in enumerate(zip(rows, tokens, reports, strict=True))
                if not self._advance(r, t, outbox, lp)
            ]
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

    def _sample(self, logits: Any, rows: list[_Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Pick each row's next token; report log-probabilities for the rows that asked.

        The reported distribution is the one sampled from: the model's own (log-softmax of
        its logits) at temperature 0, else that of the logits divided by the temperature.
        Under ``top_p`` the values are those of the temperature-scaled distribution *before*
        the nucleus cut (as vLLM and OpenAI report them): tokens outside the nucleus keep
        their probability, so an alternative may be listed that could not have been drawn.
        """
        import torch

        for i, r in enumerate(rows):
            if r.guide is not None:
                r.guide.mask(logits[i])
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        reports: list[TokenLogprobs | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature == 0:
                if p.logprobs is not None:
                    reports[i] = self._report(torch.log_softmax(logits[i], dim=-1), tokens[i], p.logprobs)
                continue
            scaled = logits[i] / p.temperature
            probs = torch.softmax(scaled, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
                outside[0] = False  # a top_p below float32's smallest value rounds to 0 and would keep none
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                choice = torch.multinomial(sorted_probs, 1, generator=r.generator)
                tokens[i] = int(order[choice].item())
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
            if p.logprobs is not None:
                reports[i] = self._report(torch.log_softmax(scaled, dim=-1), tokens[i], p.logprobs)
        for r, token in zip(rows, tokens, strict=True):
            if r.guide is not None:
                r.guide.accept(token)
        return tokens, reports

    def _report(self, logprobs: Any, token: int, top: int) -> TokenLogprobs:
        """``token``'s entry of one row's log-probabilities and the ``top`` largest ones."""
        import torch

        assert self._token_bytes is not None
        spell = self._token_bytes.of

        def entry(token_id: int, value: float) -> Logprob:
            text, raw = spell(token_id)
            return Logprob(token_id=token_id, token=text, bytes=raw, logprob=value)

        best: list[Logprob] = []
        if top:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            best = [entry(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprobs(chosen=entry(token, float(logprobs[token].item())), top=best)

    def _advance(
        self, r: _Request, token: int, outbox: list[tuple[_Request, Chunk]], report: TokenLogprobs | None = None
    ) -> bool:
        """Record ``token`` for ``r``, queue any safe new text in ``outbox``; True when ``r`` finished."""
        r.out_ids.append(token)
        r.pending_ids.append(token)
        if report is not None:
            r.pending_logprobs.append(report)
        logprobs = r.pending_logprobs if r.params.logprobs is not None else None
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
            if token in self._eos_ids or token in r.stop_ids or token in r.params.stop_token_ids:
                reason = "stop"
            elif len(r.out_ids) >= r.params.max_tokens:
                reason = "length"
            elif self._max_context is not None and len(r.prompt_ids) + len(r.out_ids) >= self._max_context:
                reason = "length"
        if reason is not None:
            r.done = True
            outbox.append((r, Chunk(text[r.emitted : max(end, r.emitted)], r.pending_ids, reason, logprobs)))
            return True
        # Hold back an incomplete character and anything that may grow into a stop string.
        safe = len(text.rstrip("\ufffd"))
        if stops:
            safe -= _stop_holdback(text[:safe], stops)
        if safe > r.emitted:
            outbox.append((r, Chunk(text[r.emitted : safe], r.pending_ids, logprobs=logprobs)))
            r.pending_ids = []
            r.pending_logprobs = []
            r.emitted = safe
        return False
