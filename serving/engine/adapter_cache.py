"""The engine's loaded LoRA adapters: load on first use, least-recently-used eviction, per-row routing.

This is the one seam between the scheduler and how adapters are applied. The scheduler
asks `ensure` for each admitted request's adapter (with the adapters of rows still in
flight as ``keep``), enters `batch` for a run of steps and calls `set_rows` before every
forward with one internal name per row. Today the rows are routed through PEFT with
`LoraRouter` (per-row ``adapter_names``; adapters PEFT cannot mix run in exclusive batches);
a stacked multi-LoRA implementation can replace this class behind the same methods.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry.errors import MissingDependencyError
from serving.engine.loading import LOAD_LOCK
from serving.engine.lora_routing import BASE_ADAPTER, LoraRouter, strip_lora

logger = logging.getLogger(__name__)


class AdapterCache:
    """PEFT LoRA adapters loaded on one base model, at most ``capacity`` at a time.

    Args:
        model: the base model; after the first load `model` is the ``PeftModel`` around it.
        model_id: the served model's name, for logs.
        capacity: most adapters loaded at once (so also most distinct adapters per batch).
    """

    def __init__(self, model: Any, model_id: str, capacity: int) -> None:
        self.model = model
        self.model_id = model_id
        self.capacity = capacity
        # public name -> PEFT-internal name, in least-recently-used order.
        self.loaded: OrderedDict[str, str] = OrderedDict()
        self.paths: dict[str, Path] = {}
        # public name -> why it cannot share a batch with other adapters (see LoraRouter).
        self.exclusive: dict[str, str] = {}
        self._router: LoraRouter | None = None
        self._seq = 0

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
        with LOAD_LOCK:  # engines share the process: adapter loads race like base loads
            if self._router is None:
                try:
                    from peft import PeftModel
                except ImportError as exc:
                    raise MissingDependencyError("serving LoRA adapters needs peft: pip install peft") from exc
                try:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=internal).eval()
                except Exception:
                    # PEFT injects its layers into the base in place before it loads the weights:
                    # take them out again, or the base would answer with a half-loaded adapter.
                    strip_lora(self.model)
                    raise
                self._router = LoraRouter(self.model)
            else:
                try:
                    self.model.load_adapter(str(path), adapter_name=internal)
                except Exception:
                    self._forget(internal)
                    raise
                self.model.eval()
        self._router.refresh()
        self.loaded[name] = internal
        self.paths[name] = path
        reason = self._router.exclusive_reason(internal)
        if reason is not None:
            self.exclusive[name] = reason
            logger.info("engine %s: adapter %s runs in batches of its own: %s", self.model_id, name, reason)
        logger.info("engine %s: loaded adapter %s from %s (%d loaded)", self.model_id, name, path, len(self.loaded))

    @contextmanager
    def batch(self, exclusive: str | None) -> Iterator[None]:
        """Hold the adapter state of a run of steps; reset on the way out, however that goes.

        Args:
            exclusive: the public name of an exclusive adapter whose rows run alone, or None.
        """
        if self._router is None:
            yield
            return
        with self._router.batch(self.loaded[exclusive] if exclusive is not None else None):
            yield

    def set_rows(self, names: list[str], tokens_per_row: int) -> None:
        """Name each row's adapter (internal names, `BASE_ADAPTER`: none) for the next forward."""
        if self._router is not None:
            # Always name every row once wrapped: unnamed rows would get PEFT's active adapter.
            self._router.route(names, tokens_per_row)

    def _forget(self, internal: str) -> None:
        """Remove what a failed load left of PEFT adapter ``internal`` (best effort)."""
        try:
            self.model.delete_adapter(internal)
        except Exception:  # noqa: BLE001 - nothing of it may have been created
            logger.debug("nothing to clean up for adapter %s", internal, exc_info=True)
        if self._router is not None:
            self._router.refresh()

    def _unload(self, name: str) -> None:
        internal = self.loaded.pop(name)
        self.paths.pop(name, None)
        self.exclusive.pop(name, None)
        self.model.delete_adapter(internal)
        if self._router is not None:
            self._router.refresh()
        logger.info("engine %s: unloaded adapter %s", self.model_id, name)
