"""Continuous batching: requests join the running batch at the next step and leave when done.

One worker thread owns the model and loops: take new requests from the inbox, admit the
ones that fit into a *prefill group*, run one prefill chunk of that group, then one decode
step of the running batch. A group's prompts (at most half of it padding) are left-padded
and prefilled into a cache of their own, ``prefill_chunk`` tokens per step while rows
decode (all at once when none do), so a long prompt never stalls the running rows for more
than one chunk; when the group's last chunk is done its rows sample their first
token and their KV rows are spliced into the running batch's cache (`kv_rows.join`). Rows
that finish or whose consumer went away leave with `kv_rows.select`, which also trims the
leading columns that became padding in every row. A nearly full batch holds waiting requests
back briefly so that several join with one prefill forward rather than one forward each
(`Scheduler._join_now`: a forward's fixed cost is worth 15-20 prompt columns on a CPU). For the
same reason, where the model allows it (`fused_step.fused_support`, decided at load; not in an
exclusive PEFT adapter batch) a group's prefill chunk and the decode step run as one forward
(`fused_step`): the group's rows then get their first token at the end of that step and decode
from the next.

Why our own scheduler and not transformers' ``ContinuousBatchingManager`` (read in
transformers 5.24, ``generation/continuous_batching/``): the manager packs all requests into
one flat row over a paged cache and swaps the model's attention implementation for its
paged kernels. That leaves no batch rows for per-row adapters (the stacked multi-LoRA
layers gather each row's A/B; PEFT's ``adapter_names`` likewise), its logits processors are configured
per manager rather than per request (no per-request seeds, `TokenGuide` masks or top-k
logprobs), and cancellation and streaming are per request id with its own thread. So the
scheduler is built on transformers' `DynamicCache` (its layers replaced by
`kv_rows`' growable ones, which append a decode step's column in place) and model forward,
with explicit per-row ``position_ids`` (rotary and learned absolute positions stay right
under padding).
A model whose cache layers cannot be joined row-wise (`kv_rows.UnsplicableCacheError`)
falls back to static batching: new rows are admitted only when the running batch is empty.

Adapters: rows of different adapters share the batch through `AdapterCache` (stacked
multi-LoRA). Their adapters are resolved into `AdapterRows` (the stacked layers' row index)
only where the set of rows changes: a prefill group is formed, rows join the running batch,
rows leave it; every forward then just names the `AdapterRows` of its rows, so the prefill
group and the running batch take turns without re-indexing. An adapter the stacked layers
cannot apply (it runs on PEFT) runs in a batch of its own. Admission is first-come
first-served, except that requests whose adapter the running batch already has may go ahead
of ones that would add an adapter, for at most ``affinity_wait_s`` (fewer distinct adapters
per step); a request that does not fit the running batch's mode waits (so do those behind
it) until it drains.

Failure isolation: a prefill group that fails is retried row by row (a row that fails
alone gets the error); a failing decode step fails the rows of the running batch, which
had all streamed already. The adapter state is reset whenever the batch empties.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from serving.engine.adapter_cache import AdapterCache
from serving.engine.base import Chunk
from serving.engine.detokenizer import Detokenizer
from serving.engine.fused_step import FusedForward
from serving.engine.kv_rows import UnsplicableCacheError, check_splicable, join, new_cache, select
from serving.engine.prefix_cache import PrefixCache
from serving.engine.request import Request, flush
from serving.engine.sampling import Sampler, make_generator

logger = logging.getLogger(__name__)

STOP = object()  # sentinel that tells the worker thread to exit

AFFINITY_WAIT_S = 0.2
"""How long a request that would add an adapter to the running batch may be passed over for
requests whose adapter is already in it (see `Scheduler._prefer_batch_adapters`)."""

JOIN_ROWS = 4
"""Fewest free rows of a nearly full running batch worth a prefill forward (see `Scheduler._join_now`)."""

JOIN_WAIT_S = 0.1
"""Longest a waiting request is held back so that it joins with others (see `Scheduler._join_now`)."""

Forward = Callable[[Any, Any, Any, Any, Sequence[str]], Any]
"""``(input_ids, attention_mask, position_ids, cache, adapter_names) -> last-column logits``.

``adapter_names``: one internal adapter name per row, as `AdapterRows` when the engine serves adapters."""


@dataclass
class _Group:
    """Rows being prefilled together into a cache of their own."""

    rows: list[Request]
    names: Sequence[str]  # `AdapterRows` of the group (empty without adapters)
    cache: Any
    input_ids: Any  # (rows, width) left-padded prompt tokens not yet in the cache
    mask: Any  # (rows, past + width): cached prefix columns, then the prompt columns
    positions: Any  # (rows, past + width)
    past: int  # columns already in the cache (a reused prefix)
    done: int = 0  # prompt columns fed so far


class Scheduler:
    """The worker loop: admission, chunked prefill, batched decode, row joins and leaves.

    Args:
        model_id: for logs.
        inbox: where `TorchEngine.generate` puts requests (and `STOP`).
        forward: runs the model on a batch (see `Forward`); looked up per call so tests can wrap it.
        sampler: picks tokens.
        detokenizer: streams text and applies stop rules.
        adapters: loaded adapters, or None for a base-only engine.
        device: where the model lives.
        pad_id: token fed in padding columns (masked out).
        max_batch_size: most rows decoded together.
        batch_window_s: when idle, how long to wait after a request for more to prefill together.
        prefill_chunk: most prompt tokens prefilled per step (all rows of a group together).
        prefix_cache: reuses prompt-prefix KV across requests, or None.
        observe: called with the row count of every forward (metrics).
        affinity_wait_s: longest a request is passed over for ones whose adapter the batch has.
        join_rows: fewest free rows of a nearly full running batch worth a prefill forward
            (at most an eighth of ``max_batch_size``; 1 turns holding off).
        join_wait_s: longest a request is held back so that it joins with others.
        fused: runs a decode step and a prefill chunk as one forward (`fused_step`), or None for
            two forwards; not in an exclusive (PEFT) adapter batch, nor for a row retried alone.
    """

    def __init__(
        self,
        *,
        model_id: str,
        inbox: queue.Queue[Any],
        forward: Forward,
        sampler: Sampler,
        detokenizer: Detokenizer,
        adapters: AdapterCache | None,
        device: Any,
        pad_id: int,
        max_batch_size: int,
        batch_window_s: float,
        prefill_chunk: int,
        prefix_cache: PrefixCache | None = None,
        observe: Callable[[int], None] = lambda rows: None,
        affinity_wait_s: float = AFFINITY_WAIT_S,
        join_rows: int = JOIN_ROWS,
        join_wait_s: float = JOIN_WAIT_S,
        fused: FusedForward | None = None,
    ) -> None:
        self.model_id = model_id
        self.inbox = inbox
        self.forward = forward
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.adapters = adapters
        self.device = device
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.prefill_chunk = max(prefill_chunk, 1)
        self.prefix_cache = prefix_cache
        self.observe = observe
        self.affinity_wait_s = affinity_wait_s
        # Holding rows out of a small batch costs a larger share of it: at most an eighth of it.
        self.join_rows = max(1, min(join_rows, max_batch_size // 8))
        self.join_wait_s = join_wait_s
        self.fused = fused
        self._holding_since: float | None = None  # when `_join_now` began holding waiting requests back
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._names: Sequence[str] = []  # `AdapterRows` of the running batch, rebuilt when rows join or leave
        self._cache: Any = None
        self._mask: Any = None
        self._next_pos: Any = None
        self._last: list[int] = []
        self._group: _Group | None = None
        self._mode: str | None = None  # the exclusive adapter the batch runs, None for a mixed batch
        self._context: ExitStack | None = None  # the adapter state held while rows are in flight
        self.splicable = True  # False once the model's cache proved unjoinable: static batching

    @property
    def in_flight(self) -> int:
        """Rows decoding or prefilling."""
        return len(self.running) + (len(self._group.rows) if self._group is not None else 0)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `STOP` arrives; then every request still here ends with `unavailable`."""
        import torch

        with torch.inference_mode():
            while self._take_inbox():
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - a bug here must not leave requests waiting forever
                    logger.exception("engine %s: scheduler step failed", self.model_id)
                    self._fail_everything(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL), queued=False)
        self._fail_everything(self.unavailable())

    def _step(self) -> None:
        """One round: admit, one prefill chunk, one decode step (none in the round an idle engine prefills)."""
        self._drop_cancelled()
        if self._group is None:
            self._admit()
        if self._group is not None and self.running and self._fusable(self._group):
            self._fused_step()
        elif self._group is not None and not self.running:
            # An idle engine's group: its rows decode from the next round, so a request that
            # arrived during this prefill joins that forward (fused with its own prefill where
            # the model allows) instead of also waiting for a decode step.
            self._prefill_step()
        else:
            if self._group is not None:
                self._prefill_step()
            if self.running:
                self._decode_step()
        if not self.running and self._group is None:
            self._close_batch()

    def unavailable(self) -> ForgelineError:
        return ForgelineError(f"engine for model `{self.model_id}` is not running", code=ErrorCode.UNAVAILABLE)

    def _take_inbox(self) -> bool:
        """Move new requests to ``waiting``; block while there is nothing to do. False on `STOP`."""
        items: list[Any] = []
        if not self.running and self._group is None and not self.waiting:
            items.append(self.inbox.get())
            # Idle: give requests arriving together a moment to share one prefill.
            deadline = time.monotonic() + self.batch_window_s
            while items[-1] is not STOP and len(items) < self.max_batch_size:
                try:
                    items.append(self.inbox.get(timeout=max(deadline - time.monotonic(), 0.0)))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is STOP:
                self.waiting.extend(r for r in items if isinstance(r, Request))
                return False
        now = time.monotonic()
        for r in items:
            r.arrived = r.arrived or now
        self.waiting.extend(items)
        return True

    def _drop_cancelled(self) -> None:
        if any(r.cancelled.is_set() for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())
        keep = [i for i, r in enumerate(self.running) if not r.cancelled.is_set()]
        if len(keep) < len(self.running):
            self._keep_running(keep)
        group = self._group
        if group is not None and all(r.cancelled.is_set() for r in group.rows):
            self._group = None

    # -- admission -----------------------------------------------------------------------

    def _mode_of(self, r: Request) -> str | None:
        exclusive = self.adapters.exclusive if self.adapters is not None else {}
        return r.adapter if r.adapter in exclusive else None

    def _prefer_batch_adapters(self) -> None:
        """Let waiting requests whose adapter the running batch already has go first.

        Every distinct adapter in a step is one more A/B per layer to read (`multi_lora`), so
        rows of adapters already in the batch (or of the base) join ahead of rows that would
        add one. A request is passed over only until it has waited `affinity_wait_s`; then it
        keeps its first-come place, so none starves.
        """
        if self.adapters is None or not self.running or self._mode is not None or len(self.waiting) < 2:
            return
        in_batch = {r.adapter for r in self.running} | {None}
        deadline = time.monotonic() - self.affinity_wait_s
        first = [r for r in self.waiting if r.adapter in in_batch or r.arrived <= deadline]
        if len(first) in (0, len(self.waiting)):
            return
        later = [r for r in self.waiting if not (r.adapter in in_batch or r.arrived <= deadline)]
        self.waiting = deque([*first, *later])

    def _admit(self) -> None:
        """Start a prefill group from the head of ``waiting`` (first come, first served, but see
        `_prefer_batch_adapters`)."""
        if self.running and not self.splicable:
            return
        if not self._join_now():
            return
        self._prefer_batch_adapters()
        room = self.max_batch_size - len(self.running)
        rows: list[Request] = []
        past = 0
        while self.waiting and len(rows) < room:
            r = self.waiting[0]
            active = bool(self.running or rows)
            mode = self._mode if self.running else (self._mode_of(rows[0]) if rows else None)
            if active and mode is not None and r.adapter != mode:
                break  # an exclusive batch takes only its own adapter's rows
            if r.adapter is not None and not self._load_adapter(r, rows):
                if self.waiting and self.waiting[0] is r:
                    break  # no room for another adapter until rows leave
                continue  # it failed to load and got the error
            if active and self._mode_of(r) != mode:
                break
            hit = self._hit(r)
            width = max(len(x.prompt_ids) for x in [*rows, r]) - hit
            real = sum(len(x.prompt_ids) - hit for x in [*rows, r])
            if rows and (r.solo or hit != past or (len(rows) + 1) * width > 2 * real):
                break  # at most half of a group is padding; a retried row runs alone
            past = hit  # a group's rows reuse cached prefixes of one length
            self.waiting.popleft()
            r.generator = make_generator(r.params, self.device)
            rows.append(r)
            if r.solo:
                break
        if not rows:
            return
        if self._context is None:
            self._open_batch(self._mode_of(rows[0]))
        try:
            self._group = self._new_group(rows, past)
        except Exception as exc:  # noqa: BLE001 - these rows are out of the queue: they must hear about it
            logger.exception("engine %s: preparing a prefill of %d rows failed", self.model_id, len(rows))
            for r in rows:
                r.fail(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))

    def _join_now(self) -> bool:
        """Whether to start a prefill group now, or let the waiting requests gather a little.

        Every forward pays a fixed cost besides its rows' work (on a CPU: streaming the weights
        once, and the model's Python), about as much as 15-20 prompt columns on the `small`
        benchmark model. When the running batch is full, rows leave one at a time, so
        admitting at once makes a prefill forward of one prompt per leaving row. A nearly full
        batch therefore holds the waiting requests until `join_rows` rows are free (or as many as
        are waiting), for at most `join_wait_s`. A batch with room for that many admits at once,
        so an engine under light load starts every request at the next step.
        """
        room = self.max_batch_size - len(self.running)
        if not self.running or not self.waiting or room >= min(self.join_rows, len(self.waiting)):
            self._holding_since = None
            return True
        now = time.monotonic()
        if self._holding_since is None:
            self._holding_since = now
        if now - self._holding_since < self.join_wait_s:
            return False
        self._holding_since = None
        return True

    def _rows(self, names: list[str]) -> Sequence[str]:
        """Resolve the adapters of a new set of rows, once (not per step)."""
        return self.adapters.rows(names) if self.adapters is not None else []

    def _internal(self, r: Request) -> str | None:
        return self.adapters.internal(r.adapter) if self.adapters is not None else None

    def _hit(self, r: Request) -> int:
        """Prompt tokens of ``r`` the prefix cache holds (0 without one, or for a retried row)."""
        if self.prefix_cache is None or r.solo:
            return 0
        return self.prefix_cache.hit_length(r.prompt_ids, self._internal(r))

    def _load_adapter(self, r: Request, rows: list[Request]) -> bool:
        """Make sure ``r``'s adapter is loaded; False when there is no room or it failed (then ``r`` got the error)."""
        assert self.adapters is not None and r.adapter is not None and r.adapter_path is not None
        keep = {x.adapter for x in [*self.running, *rows] if x.adapter is not None}
        if not self.adapters.has_room(r.adapter, r.adapter_path, keep):
            return False
        if not self.adapters.is_loaded(r.adapter, r.adapter_path) and self._mode is not None and self._context:
            return False  # loading re-scans LoRA layers, which would undo an exclusive batch's state
        try:
            self.adapters.ensure(r.adapter, r.adapter_path, keep=keep)
        except Exception as exc:  # noqa: BLE001 - a bad adapter must not take the base down
            from registry.errors import ConflictError

            if not isinstance(exc, ForgelineError):
                logger.exception("engine %s: loading adapter %s from %s failed", self.model_id, r.adapter, r.adapter_path)
                exc = ConflictError(
                    f"adapter `{r.adapter}` cannot be served on `{self.model_id}`: loading it failed: {exc}",
                    param="model",
                )
            # Every waiting request for this adapter gets the same answer.
            for other in [x for x in self.waiting if x.adapter == r.adapter and x.adapter_path == r.adapter_path]:
                self.waiting.remove(other)
                other.fail(exc)
            return False
        return True

    def _new_group(self, rows: list[Request], past: int) -> _Group:
        import torch

        names = self._rows([self.adapters.internal(r.adapter) for r in rows] if self.adapters is not None else [])
        cache = None
        if past and self.prefix_cache is not None:
            cache = self.prefix_cache.lookup([r.prompt_ids for r in rows], [self._internal(r) for r in rows], past)
        if cache is None:
            cache, past = new_cache(), 0
        prompts = [r.prompt_ids[past:] for r in rows]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), past + width), dtype=torch.long)
        mask[:, :past] = 1
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, past + width - len(p) :] = 1
        # Positions count real tokens only, so padding does not shift a row's rotary phase.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return _Group(rows, names, cache, input_ids.to(dev), mask.to(dev), positions.to(dev), past)

    # -- steps -------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        group = self._group
        assert group is not None
        width = group.input_ids.shape[1]
        start, end = self._chunk(group)
        try:
            self.observe(len(group.rows))
            logits = self.forward(
                group.input_ids[:, start:end],
                group.mask[:, : group.past + end],
                group.positions[:, group.past + start : group.past + end],
                group.cache,
                group.names,
            )
        except Exception as exc:  # noqa: BLE001 - the worker must survive to serve the next request
            self._group = None
            self._prefill_failed(group, exc)
            return
        group.done = end
        if end == width:
            self._prefilled(group, logits)

    def _chunk(self, group: _Group) -> tuple[int, int]:
        """The prompt columns of ``group`` to feed next."""
        width = group.input_ids.shape[1]
        # Chunks only matter while rows decode: an idle engine prefills the group at once.
        columns = max(1, self.prefill_chunk // len(group.rows)) if self.running else width
        return group.done, min(group.done + columns, width)

    def _prefilled(self, group: _Group, logits: Any) -> None:
        """The group's last chunk is in: store its prefixes, sample its first tokens, join the batch."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(group.rows, [self._internal(r) for r in group.rows], group.cache, group.mask)
        self._first_tokens(group, logits)
        self._group = None  # only now: if the splice fails, the group's rows are failed as in flight

    def _prefill_failed(self, group: _Group, exc: BaseException) -> None:
        if len(group.rows) == 1 or any(r.solo for r in group.rows):
            logger.exception("engine %s: request failed on its own", self.model_id)
            for r in group.rows:
                r.fail(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))
            return
        logger.exception("engine %s: prefill of %d rows failed; retrying them one by one", self.model_id, len(group.rows))
        for r in reversed(group.rows):
            r.solo = True
            self.waiting.appendleft(r)

    def _first_tokens(self, group: _Group, logits: Any) -> None:
        """Sample the group's first tokens and splice the rows that go on into the running batch."""
        import torch

        try:
            tokens, reports = self.sampler.sample(logits, group.rows)
        except Exception as exc:  # noqa: BLE001 - a guide may raise: its row fails alone
            self._prefill_failed(group, exc)
            return
        outbox: list[tuple[Request, Chunk]] = []
        keep = [
            i
            for i, (r, t, lp) in enumerate(zip(group.rows, tokens, reports, strict=True))
            if not self.detokenizer.advance(r, t, outbox, lp)
        ]
        flush(outbox)
        keep = [i for i in keep if not group.rows[i].cancelled.is_set()]
        if not keep:
            return
        cache, mask = group.cache, group.mask
        if len(keep) < len(group.rows):
            mask, keep = select(cache, mask, keep)
        rows = [group.rows[i] for i in keep]
        next_pos = torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long, device=self.device)
        last = [tokens[i] for i in keep]
        if not self.running:
            self._cache, self._mask, self._next_pos = cache, mask, next_pos
            self._mode = self._mode_of(rows[0])
            try:
                check_splicable(cache)
            except UnsplicableCacheError as exc:
                if self.splicable:
                    logger.warning("engine %s: static batching only: %s", self.model_id, exc)
                self.splicable = False
        else:
            self._mask = join(self._cache, self._mask, cache, mask)
            self._next_pos = torch.cat([self._next_pos, next_pos])
        if not self.running and len(keep) == len(group.rows):
            self._names = group.names  # the group becomes the batch: its rows' index is already built
        elif group.names:
            self._names = self._rows([*self._names, *(group.names[i] for i in keep)])
        self.running.extend(rows)
        self._last.extend(last)

    def _decode_inputs(self) -> Any:
        """The running rows' step tokens; extends the batch mask by the step's column."""
        import torch

        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.running), 1))], dim=1)
        return torch.tensor(self._last, dtype=torch.long, device=self.device).unsqueeze(1)

    def _decode_step(self) -> None:
        step_ids = self._decode_inputs()
        try:
            self.observe(len(self.running))
            logits = self.forward(step_ids, self._mask, self._next_pos.unsqueeze(1), self._cache, self._names)
        except Exception as exc:  # noqa: BLE001 - the worker must survive to serve the next request
            self._decode_failed(exc)
            return
        self._decoded(logits)

    def _fusable(self, group: _Group) -> bool:
        """Whether ``group``'s chunk may ride in the decode step's forward.

        Not in an exclusive (PEFT) adapter batch, and not for a row retried alone after its
        group failed: should it fail again, it must fail alone, not with the running rows.
        """
        return self.fused is not None and self._mode is None and not any(r.solo for r in group.rows)

    def _fused_step(self) -> None:
        """The prefill group's next chunk and the running batch's decode step in one forward (`fused_step`)."""
        group, fused = self._group, self.fused
        assert group is not None and fused is not None and self._fusable(group)
        start, end = self._chunk(group)
        last = end == group.input_ids.shape[1]
        step_ids = self._decode_inputs()
        try:
            self.observe(len(self.running) + len(group.rows))
            logits, group_logits = fused(
                step_ids,
                self._mask,
                self._next_pos.unsqueeze(1),
                self._cache,
                group.input_ids[:, start:end],
                group.mask[:, : group.past + end],
                group.positions[:, group.past + start : group.past + end],
                group.cache,
                last,
                self._names,
                group.names,
            )
        except Exception as exc:  # noqa: BLE001 - the worker must survive to serve the next request
            # Both caches may be half written: the rows in flight fail as a failed decode step does, the
            # group's are retried (one by one) on two forwards, which serve from now on.
            logger.exception("engine %s: fused step failed; running prefill and decode apart from now on", self.model_id)
            self.fused = None
            self._decode_failed(exc)
            self._group = None
            self._prefill_failed(group, exc)
            return
        group.done = end
        self._decoded(logits)
        if last:
            self._prefilled(group, group_logits)

    def _decode_failed(self, exc: BaseException) -> None:
        logger.exception("engine %s: decode step of %d rows failed", self.model_id, len(self.running))
        for r in self.running:
            r.fail(ForgelineError(f"generation failed: {exc}", code=ErrorCode.INTERNAL))
        self._keep_running([])

    def _decoded(self, logits: Any) -> None:
        """Sample the running rows' next tokens from their step's ``logits``, stream them, drop finished rows."""
        self._next_pos = self._next_pos + 1
        try:
            tokens, reports = self.sampler.sample(logits, self.running)
        except Exception as exc:  # noqa: BLE001 - the worker must survive to serve the next request
            self._decode_failed(exc)
            return
        outbox: list[tuple[Request, Chunk]] = []
        keep = [
            i
            for i, (r, t, lp) in enumerate(zip(self.running, tokens, reports, strict=True))
            if not self.detokenizer.advance(r, t, outbox, lp)
        ]
        flush(outbox)
        self._last = tokens
        keep = [i for i in keep if not self.running[i].cancelled.is_set()]
        if len(keep) < len(self.running):
            self._keep_running(keep)

    def _keep_running(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the running batch."""
        if not keep:
            self.running, self._names, self._last = [], [], []
            self._cache = self._mask = self._next_pos = None
            return
        self._mask, keep = select(self._cache, self._mask, keep)  # keep: the rows' new order
        self._next_pos = self._next_pos.index_select(0, self._mask.new_tensor(keep))
        self.running = [self.running[i] for i in keep]
        self._names = self._rows([self._names[i] for i in keep]) if self._names else []
        self._last = [self._last[i] for i in keep]

    # -- adapter state -----------------------------------------------------------------

    def _open_batch(self, mode: str | None) -> None:
        self._context = ExitStack()
        if self.adapters is not None:
            self._context.enter_context(self.adapters.batch(mode))
        self._mode = mode

    def _close_batch(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.close()
        self._mode = None

    def _fail_everything(self, exc: BaseException, *, queued: bool = True) -> None:
        """End every row in flight (and, with ``queued``, every waiting one) with ``exc``."""
        rows = [*self.running, *(self._group.rows if self._group is not None else [])]
        if queued:
            rows += self.waiting
            self.waiting.clear()
        self.running, self._names, self._last = [], [], []
        self._cache = self._mask = self._next_pos = None
        self._group = None
        self._close_batch()
        for r in rows:
            r.fail(exc)
