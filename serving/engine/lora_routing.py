"""Route each row of a batch through its own LoRA adapter on a PEFT model.

PEFT's own mixed-batch inference (``adapter_names=[...]``) hands every LoRA layer one
name per batch row. That breaks on mixture-of-experts bases in two ways (peft 0.21,
transformers 5):

* MoE blocks flatten ``(batch, seq, hidden)`` to ``(tokens, hidden)`` before their shared
  expert and router, so a LoRA layer there sees ``batch * seq`` rows and PEFT raises
  "Length of `adapter_names` should be the same as the number of inputs".
* Routed experts are fused 3-D parameters adapted through ``target_parameters``
  (``lora.ParamWrapper``), which refuse ``adapter_names`` altogether ("does not support
  mixed adapter batches"), so once such an adapter is loaded *every* forward fails.

`LoraRouter` therefore injects the names itself, with one forward pre-hook per mixable
LoRA layer that expands the per-row names to per-token names when a layer sees flattened
tokens. Adapters living in layers that cannot mix rows (fused experts, DoRA, attention
modules) are *exclusive*: they run in batches of their own, with PEFT's active adapter
set, while every other batch keeps those layers switched off. The router's state is reset
after every batch, so a failed forward leaves nothing behind for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's per-row name for "no adapter"


class RoutingError(ValueError):
    """A LoRA layer saw a row count that matches neither the batch nor its tokens."""


class LoraRouter:
    """Per-row adapter routing for a ``peft.PeftModel`` holding several LoRA adapters.

    Call `refresh` after every adapter load or unload and `exclusive_reason` to learn
    whether an adapter can share batches; run each batch inside `batch` and name its rows
    with `route` before every forward.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._hooks: list[Any] = []
        self._toggled: list[Any] = []  # LoRA layers that cannot mix rows: off outside exclusive batches
        self._names: list[str] | None = None
        self._tokens_per_row = 1
        self._exclusive: str | None = None

    def refresh(self) -> None:
        """Re-scan the model's LoRA layers (after an adapter was loaded or unloaded)."""
        from peft.tuners.lora import layer as lora
        from peft.utils.other import AuxiliaryTrainingWrapper

        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._toggled.clear()
        # Like PEFT's own mixed batches: LoRA layers and `modules_to_save` copies take names.
        mixable = (lora.Linear, lora.Embedding, lora._ConvNd, AuxiliaryTrainingWrapper)
        for module in self.model.modules():
            if not isinstance(module, lora.LoraLayer | AuxiliaryTrainingWrapper):
                continue
            if isinstance(module, mixable):
                self._hooks.append(module.register_forward_pre_hook(self._inject, with_kwargs=True))
            else:
                self._toggled.append(module)
                module.enable_adapters(False)

    def exclusive_reason(self, internal: str) -> str | None:
        """Why adapter ``internal`` cannot share a batch with other adapters (None: it can)."""
        from peft.tuners.lora import layer as lora

        for name, module in self.model.named_modules():
            if not isinstance(module, lora.LoraLayer) or internal not in _adapters_of(module):
                continue
            if isinstance(module, lora.ParamWrapper):
                return f"it adapts the fused parameter `{name}.{module.parameter_name}` (routed experts)"
            if module.use_dora.get(internal, False):
                return f"it uses DoRA on `{name}`"
            if not isinstance(module, (lora.Linear, lora.Embedding, lora._ConvNd)):
                return f"it adapts `{name}` ({type(module).__name__}), which PEFT cannot batch per row"
        return None

    @property
    def exclusive(self) -> str | None:
        """The adapter of the exclusive batch now running, if one is."""
        return self._exclusive

    @contextmanager
    def batch(self, exclusive: str | None = None) -> Iterator[None]:
        """Hold the adapter state of one batch; it is reset on the way out, however that goes.

        Args:
            exclusive: the one adapter of an exclusive batch (see `exclusive_reason`);
                None for a mixed batch, whose rows are named before each forward by `route`.
        """
        if exclusive is not None:
            self.model.base_model.set_adapter(exclusive)
            for module in self._toggled:
                module.enable_adapters(True)
        self._exclusive = exclusive
        try:
            yield
        finally:
            self._names = None
            self._exclusive = None
            if exclusive is not None:
                for module in self._toggled:
                    module.enable_adapters(False)

    def route(self, names: list[str], tokens_per_row: int) -> None:
        """Name each row's adapter (`BASE_ADAPTER`: none) for the next forward of a mixed batch.

        Args:
            names: one adapter name per batch row.
            tokens_per_row: the tokens each row feeds this forward (prompt width, then 1).
        """
        # In an exclusive batch PEFT's active adapter does the routing: names would only
        # trip layers that refuse them (DoRA).
        self._names = None if self._exclusive is not None else names
        self._tokens_per_row = max(tokens_per_row, 1)

    def _inject(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        names = self._names
        if names is None:
            return None
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        kwargs["adapter_names"] = self._names_for(int(x.shape[0]), names)
        return args, kwargs

    def _names_for(self, rows: int, names: list[str]) -> list[str]:
        if rows == len(names):
            return names
        if len(set(names)) == 1:
            return [names[0]] * rows  # one adapter for all: any row layout works
        per_row = self._tokens_per_row
        if rows == len(names) * per_row:
            # A (batch, seq, hidden) tensor flattened to (batch * seq, hidden) keeps each
            # row's tokens together, row after row.
            return [n for n in names for _ in range(per_row)]
        raise RoutingError(
            f"a LoRA layer saw {rows} inputs for a batch of {len(names)} rows of {per_row} tokens; "
            "its rows cannot be matched to adapters"
        )


def _adapters_of(module: Any) -> set[str]:
    return set(module.lora_A.keys()) | set(getattr(module, "lora_embedding_A", {}).keys())


def strip_lora(model: Any) -> None:
    """Put back the original module wherever PEFT wrapped one in a LoRA layer (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, child_name, child.get_base_layer())
