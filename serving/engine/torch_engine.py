"""The portable PyTorch engine: a transformers causal LM served with continuous batching.

`TorchEngine` is the `Engine` the gateway talks to: it tokenizes, checks limits, resolves
adapters and streams each request's chunks back to its asyncio queue. One background thread
owns the model and runs `serving.engine.scheduler.Scheduler` (continuous batching with
chunked prefill over transformers' `DynamicCache`; its docstring says why not transformers'
own ``ContinuousBatchingManager``). The parts, one module each:

* `loading` - weights and tokenizer, refusing incomplete weights;
* `scheduler` - admission, chunked prefill, batched decode, rows joining and leaving;
* `kv_rows` - splicing rows into and out of the left-padded batch cache;
* `fused_step` - a joining group's prefill chunk run in the decode step's forward (a ragged batch);
* `prefix_cache` - reused KV of shared prompt prefixes (opt-in, ``prefix_cache_tokens``);
* `sampling` - guides, greedy / temperature / top-p, logprobs, per-request seeds;
* `detokenizer` - streamed text, stop strings and stop tokens;
* `counted_prompts` - the ids of prompts counted for admission, so `generate` tokenizes none twice;
* `adapter_cache` - LoRA adapters loaded on first use, LRU-evicted, mixed per row by the
  stacked layers of `multi_lora` (PEFT, in batches of their own, for the rest).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError, ModelNotFoundError
from serving.cpu_pool import run_cpu
from serving.engine.adapter_cache import AdapterCache
from serving.engine.adapter_chat import BASE_CHAT, AdapterChat, read_adapter_chat
from serving.engine.base import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_SIZE,
    Chunk,
    EngineDtype,
    EngineStats,
    SamplingParams,
)
from serving.engine.counted_prompts import CountedPrompts
from serving.engine.detokenizer import Detokenizer
from serving.engine.fused_step import fused_forward, fused_support
from serving.engine.grammar import GuideCompiler
from serving.engine.loading import check_dtype, load_model, max_prompt_chars
from serving.engine.lora_routing import BASE_ADAPTER
from serving.engine.prefix_cache import PrefixCache
from serving.engine.request import Request, take_queued
from serving.engine.sampling import Sampler
from serving.engine.scheduler import STOP, Scheduler
from serving.engine.token_bytes import TokenBytes
from serving.engine.tool_formats import ToolFormat, detect_tool_format

logger = logging.getLogger(__name__)

__all__ = ["BASE_ADAPTER", "AdapterSource", "EngineStats", "TorchEngine"]

_Request = Request  # the name tests and older callers import

AdapterSource = Callable[[str], Path] | Mapping[str, "str | Path"]
"""Where adapters come from: a mapping name -> PEFT folder, or a function that returns the
folder for a name and raises `ModelNotFoundError` for unknown ones (it may block: it is
called off the event loop)."""


class TorchEngine:
    """Serve a transformers causal LM from a local folder, with continuous batching.

    Args:
        model_dir: a folder with config, safetensors weights and tokenizer (for example an
            artifact from `serving.artifacts.torch_build.build_torch_artifact`).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        max_batch_size: most requests decoded together (`base.DEFAULT_MAX_BATCH_SIZE` says
            why 64 on a CPU; lower it where KV memory is tight).
        batch_window_ms: when the engine is idle, how long it waits after a request for more
            to prefill together; requests arriving while it decodes join at the next step
            (`base.DEFAULT_BATCH_WINDOW_MS` says why 0 by default).
        model_id: name used in logs and errors; defaults to the folder name.
        num_threads: CPU only: torch intra-op threads for decoding. The default leaves one
            core free, because spinning OpenMP workers on every core starve the event loop
            thread that streams tokens (measured 5-7x slower decoding on 2 cores).
        adapters: PEFT LoRA adapters this engine may serve on its base weights (see
            `AdapterSource`); None serves the base only.
        max_loaded_adapters: most adapters kept loaded; the least recently used one is
            unloaded to make room. Also the most distinct adapters in one batch.
        prefill_chunk: most prompt tokens prefilled between two decode steps, so a long
            prompt delays the running rows by one chunk at a time.
        prefix_cache_tokens: tokens of prompt-prefix KV kept for reuse (a shared system
            prompt is prefilled once); 0 turns prefix reuse off.
        fused_step: run a joining group's prefill chunk in the same forward as the running
            batch's decode step where that is exactly right for the model (`fused_step`,
            decided at start; with adapters too, except in an exclusive PEFT batch); False always runs
            two forwards.
        dtype: the weights' dtype (`base.EngineDtype`): ``auto`` is float32 on a CPU and the
            artifact's own on a GPU; ``bfloat16`` decodes about twice as fast on CPUs with
            bf16 matrix instructions. Logits are sampled in float32 whatever it is.
    """

    reports_logprobs = True  # from the decode step, see `Sampler.sample`
    # Also a `serving.engine.structured.StructuredEngine`: `guide_compiler`, `tool_format`, `render_chat(tools=)`.

    step_listener: Callable[[int], None] | None = None
    """Called on the worker thread with the number of rows of every forward (metrics)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        model_id: str | None = None,
        num_threads: int | None = None,
        adapters: AdapterSource | None = None,
        max_loaded_adapters: int = 8,
        prefill_chunk: int = 256,
        prefix_cache_tokens: int = 0,
        fused_step: bool = True,
        dtype: EngineDtype = "auto",
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        if max_loaded_adapters <= 0:
            raise ValueError(f"max_loaded_adapters must be > 0, got {max_loaded_adapters}")
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {prefill_chunk}")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0, got {prefix_cache_tokens}")
        check_dtype(dtype)
        self.model_dir = Path(model_dir)
        self.model_id = model_id or self.model_dir.name
        self.max_batch_size = max_batch_size
        self.batch_window_s = max(batch_window_ms, 0.0) / 1000.0
        self.prefill_chunk = prefill_chunk
        self.prefix_cache_tokens = prefix_cache_tokens
        self.fused_step = fused_step
        self.max_loaded_adapters = max_loaded_adapters
        self._device_spec = device
        self._dtype = dtype
        self._num_threads_arg = num_threads
        self._num_threads: int | None = None
        self._ready = False
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self._adapters: AdapterCache | None = None
        self._detokenizer: Detokenizer | None = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._eos_ids: set[int] = set()
        self._max_context: int | None = None
        self._max_prompt_chars: int | None = None
        self._counted = CountedPrompts()
        self._cache_kwarg = "past_key_values"
        self._forward_kwargs: dict[str, Any] = {}
        self._model: Any = None  # the base model (`_adapters.model` runs a batch when adapters are served)
        self._guides: GuideCompiler | None = None
        self._guides_lock = threading.Lock()
        self._adapter_source = adapters
        self._adapter_paths: dict[str, Path] = {}  # resolved once per public name
        self._adapter_chats: dict[str, AdapterChat] = {}  # each adapter's own chat conventions

    @property
    def ready(self) -> bool:
        """True once `start` finished and until `stop` begins."""
        return self._ready

    @property
    def serves_adapters(self) -> bool:
        """Whether requests may name an adapter."""
        return self._adapter_source is not None

    @property
    def _loaded(self) -> Mapping[str, str]:
        """Loaded adapters, public name -> PEFT-internal name, least recently used first."""
        return self._adapters.loaded if self._adapters is not None else {}

    @property
    def _exclusive(self) -> Mapping[str, str]:
        """Loaded adapters that run in batches of their own, with the reason."""
        return self._adapters.exclusive if self._adapters is not None else {}

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache while running with ``prefix_cache_tokens`` > 0."""
        return self._scheduler.prefix_cache if self._scheduler is not None else None

    def stats(self) -> EngineStats:
        """What waits, what runs and which adapters are loaded, right now."""
        scheduler = self._scheduler
        return EngineStats(
            waiting=self._inbox.qsize() + (len(scheduler.waiting) if scheduler is not None else 0),
            running=scheduler.in_flight if scheduler is not None else 0,
            loaded_adapters=tuple(self._loaded),
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer and weights (off the event loop) and start the worker thread."""
        if self._thread is not None:
            return
        self._inbox = queue.Queue()
        self._counted = CountedPrompts()  # a new tokenizer may be loaded
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._worker, name=f"forgeline-engine-{self.model_id}", daemon=True)
        self._thread.start()
        self._ready = True
        logger.info(
            "engine %s ready on %s (max_batch_size=%d, prefill_chunk=%d, cpu threads=%s)",
            self.model_id,
            self._device,
            self.max_batch_size,
            self.prefill_chunk,
            self._num_threads,
        )

    async def stop(self) -> None:
        """Stop the worker; queued and in-flight requests end with an `unavailable` error."""
        if self._thread is None:
            return
        self._ready = False
        self._inbox.put(STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                item.fail(self._unavailable())
        self._scheduler = None
        self._adapters = None
        self._model = None
        logger.info("engine %s stopped", self.model_id)

    def _load(self) -> None:
        loaded = load_model(self.model_dir, self._device_spec, self._num_threads_arg, self._dtype)
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._device = loaded.device
        self._eos_ids = loaded.eos_ids
        self._max_context = loaded.max_context
        self._cache_kwarg = loaded.cache_kwarg
        self._forward_kwargs = loaded.forward_kwargs
        self._num_threads = loaded.num_threads
        self._max_prompt_chars = max_prompt_chars(loaded.tokenizer, loaded.max_context)
        self._detokenizer = Detokenizer(loaded.tokenizer, loaded.eos_ids, loaded.max_context)
        if self._adapter_source is not None:
            self._adapters = AdapterCache(loaded.model, self.model_id, self.max_loaded_adapters)
        self._scheduler = Scheduler(
            model_id=self.model_id,
            inbox=self._inbox,
            forward=lambda *args: self._forward(*args),  # looked up per call: tests wrap `_forward`
            sampler=Sampler(TokenBytes(loaded.tokenizer)),
            detokenizer=self._detokenizer,
            adapters=self._adapters,
            device=loaded.device,
            pad_id=loaded.pad_id,
            max_batch_size=self.max_batch_size,
            batch_window_s=self.batch_window_s,
            prefill_chunk=self.prefill_chunk,
            prefix_cache=PrefixCache(max_tokens=self.prefix_cache_tokens) if self.prefix_cache_tokens else None,
            observe=self._observe_step,
            # Looked up per call, as `forward`: tests wrap `_fused_forward`.
            fused=(lambda *args: self._fused_forward(*args)) if self._fused_supported() else None,
        )

    def _fused_supported(self) -> bool:
        """Whether the scheduler may fuse prefill chunks into decode steps (decided once, logged)."""
        if not self.fused_step:
            return False
        # Probed on the base (no adapter is loaded yet): the stacked LoRA layers that wrap its
        # Linears later take each flat-row token's adapter from `AdapterCache.set_flat_rows`.
        reason = fused_support(self._model, self._cache_kwarg, self._device)
        if reason is not None:
            logger.info("engine %s: prefill and decode run as separate forwards: %s", self.model_id, reason)
            return False
        logger.info("engine %s: joining prompts are prefilled in the decode step's forward", self.model_id)
        return True

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

    def render_chat(
        self, messages: list[dict[str, Any]], *, adapter: str | None = None, tools: list[dict[str, Any]] | None = None
    ) -> str:
        """Render chat messages with the chat template, ready for the assistant turn.

        An adapter trained with its own chat template (saved with its tokenizer files) is
        rendered with that one; otherwise the base's template applies. Resolving an adapter
        the engine has not seen yet reads its folder (and maybe the registry): call it off
        the event loop for a new adapter name. ``tools`` (OpenAI function definitions) are
        passed to the template as transformers' ``apply_chat_template(tools=...)`` does.

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
                tokenizer.apply_chat_template(
                    messages, chat_template=own, tools=tools or None, tokenize=False, add_generation_prompt=True
                )
            )
        except TemplateError as exc:
            raise ForgelineError(
                f"the chat template rejected the messages: {exc}", code=ErrorCode.INVALID_REQUEST, param="messages"
            ) from exc

    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens `generate` feeds the model for ``text`` (its ids are kept for `generate`)."""
        ids = self._encode(text)
        self._counted.keep(text, ids)
        return len(ids)

    # -- structured output (the `SamplingParams.guide` seam) ------------------------------

    def guide_compiler(self) -> GuideCompiler:
        """Compiles JSON schemas and grammars for this model's vocabulary and stop tokens (built once)."""
        tokenizer = self._require_started()
        with self._guides_lock:
            if self._guides is None:
                config = getattr(self._model, "config", None)
                width = max(int(getattr(config, "vocab_size", 0) or 0), len(tokenizer))
                self._guides = GuideCompiler(tokenizer, self._eos_ids, width)
            return self._guides

    def tool_format(self, adapter: str | None = None) -> ToolFormat | None:
        """How this model (or ``adapter``, with its own template) writes tool calls; None when its template renders no tools.

        Resolving a new adapter reads its folder: call it off the event loop then.
        """
        tokenizer = self._require_started()
        own = self._resolve_adapter(adapter)[1].chat_template if adapter is not None else None
        return detect_tool_format(own or getattr(tokenizer, "chat_template", None))

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
        prompt_ids = self._counted.take(prompt)
        if prompt_ids is None:
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
                item, error = take_queued(item, request.queue)
                yield item
                if error is not None:
                    raise error
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

    def _worker(self) -> None:
        import torch

        if self._num_threads is not None:
            # Called on this thread because OpenMP thread counts are per calling thread.
            torch.set_num_threads(self._num_threads)
        assert self._scheduler is not None
        self._scheduler.run()

    def _forward(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, adapter_names: Sequence[str]
    ) -> Any:
        """Run the model on a batch; the logits of each row's last column, as float32."""
        adapters = self._adapters
        if adapters is not None:
            adapters.set_rows(_or_base(adapter_names, input_ids.shape[0]), input_ids.shape[1])
        model = adapters.model if adapters is not None else self._model
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **self._forward_kwargs,
        )
        return out.logits[:, -1, :].float()

    def _fused_forward(self, *args: Any) -> tuple[Any, Any]:
        """A decode step and a prefill chunk as one forward (`fused_step.FusedForward`'s arguments)."""
        *tensors, decode_names, group_names = args
        adapters = self._adapters
        layout = None
        if adapters is not None:
            decode, group = _or_base(decode_names, tensors[0].shape[0]), _or_base(group_names, tensors[4].shape[0])

            def layout(plan: Any) -> None:
                adapters.set_flat_rows(decode, group, width=plan.width, real=plan.real)

        return fused_forward(self._model, self._cache_kwarg, *tensors, layout=layout)

    def _observe_step(self, rows: int) -> None:
        listener = self.step_listener
        if listener is not None:
            try:
                listener(rows)
            except Exception:  # noqa: BLE001 - metrics must never break decoding
                logger.debug("step listener failed", exc_info=True)


def _or_base(names: Sequence[str], rows: int) -> Sequence[str]:
    """Each row's adapter: ``names``, or the base for every one of ``rows`` rows when none are given."""
    return names or [BASE_ADAPTER] * rows
