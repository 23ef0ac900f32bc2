"""The engine's loaded LoRA adapters: load on first use, least-recently-used eviction, per-row routing.

This is the one seam between the scheduler and how adapters are applied. The scheduler
asks `ensure` for each admitted request's adapter (with the adapters of rows still in
flight as ``keep``), enters `batch` for a run of steps, turns every set of rows it forms
(a prefill group; the running batch whenever rows join or leave) into `AdapterRows` with
`rows`, and calls `set_rows` with them before every forward (`set_flat_rows` before a fused
forward, whose one flat row carries the running batch's decode tokens and a group's chunk).

Plain LoRA adapters are read from their files into the stacked layers of the base model
(`serving.engine.multi_lora`: gather + batched matmul, any mix of adapters per batch); the
row-to-slot index is built by `rows`, once per set of rows, so `set_rows` costs nothing per
step. Adapters the stacked layers cannot apply (DoRA, LoRA on fused expert parameters,
modules to save) are loaded by PEFT into a copy of the model that shares the base weights
and run in exclusive batches (`LoraRouter`), on that copy (`model`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import ConflictError, MissingDependencyError
from serving.engine.loading import LOAD_LOCK
from serving.engine.lora_files import AdapterRefused
from serving.engine.lora_routing import BASE_ADAPTER, LoraRouter

if TYPE_CHECKING:  # multi_lora imports torch: the engine module itself must import without it
    from serving.engine.multi_lora import RowSelection

logger = logging.getLogger(__name__)


class AdapterRows(Sequence[str]):
    """The adapter of each row of one set of rows (internal names), resolved once when the set forms.

    A sequence of the names, so callers that only look at names need not know the rest.
    """

    def __init__(self, names: Sequence[str], selection: RowSelection | None) -> None:
        self.names = tuple(names)
        self.selection = selection  # None: a row runs on PEFT (an exclusive batch)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: Any) -> Any:
        return self.names[i]

    def __repr__(self) -> str:
        return f"AdapterRows({list(self.names)})"


class AdapterCache:
    """LoRA adapters loaded on one base model, at most ``capacity`` at a time.

    Args:
        model: the base model; plain LoRA adapters wrap its layers in place (stacked layers).
        model_id: the served model's name, for logs and errors.
        capacity: most adapters loaded at once (so also most distinct adapters per batch).
    """

    def __init__(self, model: Any, model_id: str, capacity: int) -> None:
        self.base = model
        self.model_id = model_id
        self.capacity = capacity
        # public name -> internal name, in least-recently-used order.
        self.loaded: OrderedDict[str, str] = OrderedDict()
        self.paths: dict[str, Path] = {}
        # public name -> why it cannot share a batch with other adapters (it runs on PEFT).
        self.exclusive: dict[str, str] = {}
        from serving.engine.multi_lora import StackedLora

        self._stack = StackedLora(model, max_adapters=capacity)
        self._peft_model: Any = None  # PEFT on a weight-sharing copy of the base, once an adapter needs it
        self._router: LoraRouter | None = None
        self._seq = 0

    @property
    def model(self) -> Any:
        """The model the next forward runs: PEFT's copy in an exclusive batch, else the stacked base."""
        if self._router is not None and self._router.exclusive is not None:
            return self._peft_model
        return self.base

    def internal(self, name: str | None) -> str:
        """The name a forward's row uses for public adapter ``name`` (None: the base)."""
        return BASE_ADAPTER if name is None else self.loaded[name]

    def is_loaded(self, name: str, path: Path) -> bool:
        return self.paths.get(name) == path and name in self.loaded

    def has_room(self, name: str, path: Path, keep: set[str]) -> bool:
        """Whether `ensure` can load ``name`` without evicting an adapter in ``keep``."""
        if self.is_loaded(name, path):
            return True
        # A reload of the same name (its folder moved) frees its own slot first.
        loaded = len(self.loaded) - (1 if name in self.loaded else 0)
        return loaded < self.capacity or any(n not in keep and n != name for n in self.loaded)

    def ensure(self, name: str, path: Path, *, keep: set[str]) -> None:
        """Load adapter ``name`` from ``path`` unless loaded; evict the least recent one not in ``keep``.

        Raises:
            ConflictError: the adapter does not fit this base (names the module, shapes and fix).
            Exception: whatever PEFT raises for an adapter it cannot load (the base is left intact).
        """
        if self.is_loaded(name, path):
            self.loaded.move_to_end(name)
            return
        if name in self.loaded:  # same name, new folder (the adapter's alias moved)
            self._unload(name)
        while len(self.loaded) >= self.capacity:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                raise RuntimeError("no adapter can be evicted")  # callers check `has_room` first
            self._unload(victim)
        self._seq += 1
        internal = f"adapter{self._seq}"  # PEFT names become module keys: no dots
        try:
            layers = self._stack.plan(path)
            if not isinstance(layers, str):
                self._stack.load(internal, layers)
        except AdapterRefused as exc:
            raise ConflictError(f"adapter `{name}` cannot be served on `{self.model_id}`: {exc}", param="model") from None
        if isinstance(layers, str):
            self._load_peft(name, path, internal, why=layers)
        self.loaded[name] = internal
        self.paths[name] = path
        logger.info("engine %s: loaded adapter %s from %s (%d loaded)", self.model_id, name, path, len(self.loaded))

    def _load_peft(self, name: str, path: Path, internal: str, *, why: str) -> None:
        """Load through PEFT an adapter the stacked layers cannot apply; it runs in batches of its own."""
        with LOAD_LOCK:  # engines share the process: adapter loads race like base loads
            if self._peft_model is None:
                try:
                    from peft import PeftModel
                except ImportError as exc:
                    raise MissingDependencyError("serving LoRA adapters needs peft: pip install peft") from exc
                from serving.engine.multi_lora import shared_copy

                # PEFT injects its layers into the model it gets: a copy sharing the base weights,
                # so a failed load leaves nothing behind and stacked batches never meet its layers.
                peft_model = PeftModel.from_pretrained(shared_copy(self.base), str(path), adapter_name=internal)
                self._peft_model = peft_model.eval()
                self._router = LoraRouter(self._peft_model)
            else:
                try:
                    self._peft_model.load_adapter(str(path), adapter_name=internal)
                except Exception:
                    self._forget(internal)
                    raise
                self._peft_model.eval()
        assert self._router is not None
        self._router.refresh()
        self.exclusive[name] = self._router.exclusive_reason(internal) or why
        logger.info("engine %s: adapter %s runs in batches of its own: %s", self.model_id, name, self.exclusive[name])

    @contextmanager
    def batch(self, exclusive: str | None) -> Iterator[None]:
        """Hold the adapter state of a run of steps; reset on the way out, however that goes.

        Args:
            exclusive: the public name of an exclusive adapter whose rows run alone, or None.
        """
        if exclusive is not None:
            assert self._router is not None, "only PEFT-loaded adapters run exclusively"
            with self._router.batch(self.loaded[exclusive]):
                yield
            return
        with self._stack.batch():
            yield

    def rows(self, names: Sequence[str]) -> AdapterRows:
        """Resolve the adapters of a set of rows (internal names, `BASE_ADAPTER`: none) once.

        Call it when the set of rows changes; `set_rows` then only points the layers at it.
        """
        stacked = all(n == BASE_ADAPTER or n in self._stack for n in names)
        return AdapterRows(names, self._stack.select(names) if stacked else None)

    def set_rows(self, rows: Sequence[str], tokens_per_row: int) -> None:
        """Name each row's adapter for the next forward (`AdapterRows` from `rows`, or plain names)."""
        if self._router is not None and self._router.exclusive is not None:
            # PEFT's active adapter routes an exclusive batch: there are no per-row names to set.
            self._router.route(list(rows), tokens_per_row)
            return
        self._stack.use(self._selection(rows), tokens_per_row)

    def set_flat_rows(self, decode: Sequence[str], group: Sequence[str], *, width: int, real: Any) -> None:
        """Name the rows of a fused forward's flat row (`multi_lora.FlatRows`): stacked adapters only.

        Args:
            decode, group: the running batch's and the prefill group's rows (`AdapterRows` from `rows`).
            width, real: the group's chunk width and where its real tokens lie (None: all of it).
        """
        if self._router is not None and self._router.exclusive is not None:
            raise RuntimeError("an exclusive (PEFT) batch runs prefill and decode as separate forwards")
        self._stack.use_flat(self._selection(decode), self._selection(group), width=width, real=real)

    def _selection(self, rows: Sequence[str]) -> RowSelection:
        """The stacked layers' selection of ``rows`` (`AdapterRows`, or plain names resolved now)."""
        if not isinstance(rows, AdapterRows):
            rows = self.rows(rows)
        if rows.selection is None:
            raise RuntimeError(f"rows {list(rows)} mix a PEFT-only adapter into a stacked batch")
        return rows.selection

    def _forget(self, internal: str) -> None:
        """Remove what a failed load left of PEFT adapter ``internal`` (best effort)."""
        try:
            self._peft_model.delete_adapter(internal)
        except Exception:  # noqa: BLE001 - nothing of it may have been created
            logger.debug("nothing to clean up for adapter %s", internal, exc_info=True)
        if self._router is not None:
            self._router.refresh()

    def _unload(self, name: str) -> None:
        internal = self.loaded.pop(name)
        self.paths.pop(name, None)
        self.exclusive.pop(name, None)
        if internal in self._stack:
            self._stack.unload(internal)
        else:
            self._peft_model.delete_adapter(internal)
            if self._router is not None:
                self._router.refresh()
        logger.info("engine %s: unloaded adapter %s", self.model_id, name)
