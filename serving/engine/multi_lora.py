"""Batched multi-LoRA: loaded adapters stacked per layer, applied by gather + batched matmul.

The way Punica and S-LoRA batch many adapters (written here for PyTorch's own ops): every
Linear (or GPT-2 ``Conv1D``) that a loaded adapter targets is replaced, once, by a
`StackedLoraLinear` that holds the base layer and two slot tensors, ``a`` ``[slots, in, r_max]``
and ``b`` ``[slots, r_max, out]`` (PEFT's ``lora_A``/``lora_B`` transposed so a gather feeds
``bmm`` directly, the scaling folded into ``b``, smaller ranks zero-padded). Slot 0 stays
zero: it is the row without an adapter. Its forward is

    y = base(x) + bmm(bmm(x, a[slot_of_row]), b[slot_of_row])

two batched products per layer however many adapters the batch mixes (the second one adds into
the base layer's output in place, ``baddbmm_``). `StackedLora.select`
turns a set of rows into a `RowSelection` (the slot of every row) when that set forms: with
continuous batching, when a prefill group is formed and when rows join or leave the running
batch, not at every step. Each layer gathers its per-row ``a``/``b`` into the selection the
first time it runs it, so a step only points the layers at a selection (`StackedLora.use`);
the prefill group's and the running batch's selections take turns without re-gathering.
Nothing is registered or removed per step. A fused forward (`serving.engine.fused_step`) runs
both at once on one flat row: `StackedLora.use_flat` points the layers at a `FlatRows`, and
each layer applies the running batch's selection to the leading decode tokens and the group's
to its chunk (zeros put back where the chunk's left padding was left out of the row).

Modules are wrapped when the first adapter targeting them loads (the engine starts with an
untouched base, and layers no adapter targets cost nothing), and stay wrapped. Loading reads
the adapter's files (`serving.engine.lora_files`) straight into a free slot: no PEFT layers
are injected. Adapters this path cannot apply (DoRA, fused expert parameters, modules to
save, LoRA on embeddings) are left to PEFT on `shared_copy` of the model, which shares the
base weights (`serving.engine.lora_routing`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.engine.lora_files import (
    AdapterRefused,
    LoraLayer,
    matches_target,
    peft_only_reason,
    read_config,
    read_lora,
)
from serving.engine.lora_routing import BASE_ADAPTER, RoutingError

__all__ = ["AdapterRefused", "FlatRows", "RowSelection", "RowSlots", "StackedLora", "StackedLoraLinear", "shared_copy"]

_UNSEEN = object()  # a layer has not gathered its rows for a selection yet


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module the stacked path can adapt, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer: weight [in, out]
        return int(module.weight.shape[0]), int(module.nf)
    return None


class RowSelection:
    """The slot of each row of one set of rows, and each layer's A/B gathered for those rows."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.index: torch.Tensor | None = None  # [rows] on the model's device
        self.slots: frozenset[int] = frozenset()  # the distinct adapter slots of `index` (0 left out)
        self.version = -1  # the `StackedLora` version `index` and `gathered` belong to
        # id(layer) -> (a_rows [rows, in, r], b_rows [rows, r, out]), or None: no row is adapted there.
        self.gathered: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}


@dataclass(frozen=True)
class FlatRows:
    """The rows of a fused forward (`serving.engine.fused_step`): one flat row of tokens.

    The running batch's ``decode_rows`` decode tokens (one per row of ``decode``) come first,
    then the real tokens of the prefill ``group``'s chunk, row after row: ``rows`` rows of
    ``width`` columns, of which ``real`` (flat indices into ``rows * width``) are in the flat
    row, or all of them when ``real`` is None.
    """

    decode: RowSelection
    group: RowSelection
    decode_rows: int
    rows: int
    width: int
    real: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return self.decode_rows + (self.rows * self.width if self.real is None else int(self.real.numel()))


class RowSlots:
    """The rows the next forward runs; shared by every `StackedLoraLinear` of one model."""

    def __init__(self) -> None:
        self.current: RowSelection | FlatRows | None = None
        self.tokens_per_row = 1


class StackedLoraLinear(nn.Module):
    """A Linear (or Conv1D) plus the LoRA of every loaded adapter that targets it, one slot each."""

    def __init__(self, base_layer: nn.Module, rows: RowSlots, slots: int) -> None:
        super().__init__()
        features = _features(base_layer)
        assert features is not None, type(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.rows = rows
        self.capacity = slots
        weight = base_layer.weight
        self.a = torch.zeros((slots, self.in_features, 0), dtype=weight.dtype, device=weight.device)
        self.b = torch.zeros((slots, 0, self.out_features), dtype=weight.dtype, device=weight.device)
        self.filled: set[int] = set()  # slots holding a non-zero LoRA in this layer

    @property
    def rank(self) -> int:
        return int(self.a.shape[2])

    def write(self, slot: int, lora: LoraLayer) -> None:
        """Put ``lora`` in ``slot`` (growing the slabs when its rank exceeds theirs)."""
        r = lora.rank
        if r > self.rank:
            a = self.a.new_zeros((self.capacity, self.in_features, r))
            b = self.b.new_zeros((self.capacity, r, self.out_features))
            a[:, :, : self.rank] = self.a
            b[:, : self.rank, :] = self.b
            self.a, self.b = a, b
        # A free slot is all zeros (see `clear`), so a smaller rank's padding needs no writing.
        self.a[slot, :, :r].copy_(lora.a.t())
        self.b[slot, :r, :].copy_(lora.b.t())
        self.filled.add(slot)

    def clear(self, slot: int) -> None:
        if slot in self.filled:
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.filled.discard(slot)

    def _gather(self, selection: RowSelection) -> tuple[torch.Tensor, torch.Tensor] | None:
        pair = None
        if selection.index is not None and selection.slots & self.filled:
            pair = (self.a.index_select(0, selection.index), self.b.index_select(0, selection.index))
        selection.gathered[id(self)] = pair
        return pair

    def _rows_of(self, selection: RowSelection) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's A/B gathered for ``selection``'s rows (gathered on first use), None: no row adapted."""
        pair = selection.gathered.get(id(self), _UNSEEN)
        return self._gather(selection) if pair is _UNSEEN else pair  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        current = self.rows.current
        if current is None:
            return y
        if isinstance(current, FlatRows):
            return self._flat(x, y, current)
        pair = self._rows_of(current)
        if pair is None:
            return y
        a, b = pair
        batch, lead = a.shape[0], x.shape[0]
        if not (lead == batch or (x.dim() == 2 and lead == batch * self.rows.tokens_per_row)):
            raise RoutingError(
                f"a LoRA layer saw input {tuple(x.shape)} for a batch of {batch} rows of "
                f"{self.rows.tokens_per_row} tokens; its rows cannot be matched to adapters"
            )
        # (rows, tokens, in) as it comes, or flattened to (rows * tokens, in) by mixture-of-experts
        # blocks before their shared expert: each row's tokens stay together, row after row.
        h = torch.bmm(x.reshape(batch, -1, self.in_features).to(a.dtype), a)
        out = y if y.is_contiguous() else y.contiguous()
        self._add(out.view(batch, -1, self.out_features), h, b)
        return out

    def _flat(self, x: torch.Tensor, y: torch.Tensor, flat: FlatRows) -> torch.Tensor:
        """The LoRA of a fused forward's flat row: the decode part per row, the group's chunk per row."""
        decode, group = self._rows_of(flat.decode), self._rows_of(flat.group)
        if decode is None and group is None:
            return y
        tokens = flat.tokens
        # (1, tokens, in) as it comes, or (tokens, in) flattened before a shared expert.
        if x.numel() != tokens * self.in_features or y.numel() != tokens * self.out_features:
            raise RoutingError(
                f"a LoRA layer saw input {tuple(x.shape)} for a fused row of {tokens} tokens; "
                "its tokens cannot be matched to adapters"
            )
        x = x.reshape(tokens, self.in_features)
        out = y if y.is_contiguous() else y.contiguous()
        flat_out = out.view(tokens, self.out_features)
        d = flat.decode_rows
        if decode is not None:
            a, b = decode
            h = torch.bmm(x[:d].unsqueeze(1).to(a.dtype), a)
            self._add(flat_out[:d].view(d, 1, self.out_features), h, b)
        if group is not None:
            a, b = group
            part = x[d:]
            if flat.real is not None:  # the chunk's left padding is not in the flat row: zeros in its place
                part = part.new_zeros((flat.rows * flat.width, self.in_features)).index_copy_(0, flat.real, part)
            h = torch.bmm(part.view(flat.rows, flat.width, self.in_features).to(a.dtype), a)
            if flat.real is None:
                self._add(flat_out[d:].view(flat.rows, flat.width, self.out_features), h, b)
            else:  # (index_select and index_copy_: several times faster than [] indexing on CPU)
                delta = torch.bmm(h, b).view(-1, self.out_features).index_select(0, flat.real)
                flat_out[d:] += delta.to(flat_out.dtype)
        return out.view(y.shape)

    @staticmethod
    def _add(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        """``out += h @ b`` per row, in place (``out`` is a view of the layer's fresh output).

        Added inside the product where the dtypes agree: a separate delta and sum would be two
        more allocations of the output's size per layer (page faults on CPU).
        """
        if out.dtype == b.dtype:
            out.baddbmm_(h, b)
        else:
            out += torch.bmm(h, b).to(out.dtype)


class StackedLora:
    """The stacked adapters of one model: slots, loading, eviction and the per-row selection.

    Args:
        model: the base model; its modules are wrapped in place as adapters load.
        max_adapters: most adapters loaded at once (one slot each, plus the zero slot).
    """

    def __init__(self, model: nn.Module, *, max_adapters: int) -> None:
        self.model = model
        self.capacity = max_adapters + 1
        self.rows = RowSlots()
        self._layers: dict[str, StackedLoraLinear] = {}
        self._slot_of: dict[str, int] = {}  # adapter name -> slot
        self._modules_of: dict[str, list[str]] = {}  # adapter name -> modules it wrote
        self._free = list(range(self.capacity - 1, 0, -1))
        self._version = 0  # bumped whenever a slab changes: selections re-index and re-gather
        self._device = next(model.parameters()).device

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._slot_of)

    def plan(self, folder: Path) -> dict[str, LoraLayer] | str:
        """Read and check the adapter at ``folder`` against this base, without loading it.

        Returns:
            The LoRA per module path, or a string: why the adapter needs PEFT's own layers.

        Raises:
            AdapterRefused: it targets modules the base lacks or does not fit their shapes.
        """
        config = read_config(folder)
        reason = peft_only_reason(config)
        if reason is not None:
            return reason
        modules = dict(self.model.named_modules())
        targets = config.get("target_modules")
        if targets and not any(matches_target(n, targets) for n in modules):
            raise AdapterRefused(
                f"none of its target_modules ({targets}) is a module of this base; fix: train the adapter on "
                "this base model (or one with the same module names)"
            )
        layers = read_lora(folder, config)
        if isinstance(layers, str):
            return layers
        missing = [m for m in layers if m not in modules]
        if missing:
            shown = ", ".join(f"`{m}`" for m in missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise AdapterRefused(f"its weights adapt {shown}, which this base lacks; fix: train it on this base")
        for name, lora in layers.items():
            module = modules[name]
            base = module.base_layer if isinstance(module, StackedLoraLinear) else module
            features = _features(base)
            if features is None:
                return f"it adapts `{name}` ({type(base).__name__}), which the stacked path only does for Linear layers"
            want = (int(lora.a.shape[1]), int(lora.b.shape[0]))
            if want != features:
                raise AdapterRefused(
                    f"`{name}` takes {features[0]} inputs and gives {features[1]} outputs but the adapter's LoRA is "
                    f"{want[0]} -> {want[1]}; fix: train the adapter on this base model"
                )
        return layers

    def load(self, name: str, layers: dict[str, LoraLayer]) -> None:
        """Write ``layers`` (from `plan`) into a free slot under ``name``.

        Raises:
            AdapterRefused: every slot is taken (unload one first).
        """
        if name in self._slot_of:
            raise ValueError(f"adapter {name} is already loaded")
        if not self._free:
            raise AdapterRefused(f"all {self.capacity - 1} adapter slots are taken")
        slot = self._free.pop()
        try:
            for module_name, lora in layers.items():
                self._layer(module_name).write(slot, lora)
        except BaseException:
            for module_name in layers:
                if module_name in self._layers:
                    self._layers[module_name].clear(slot)
            self._free.append(slot)
            raise
        self._slot_of[name] = slot
        self._modules_of[name] = list(layers)
        self._changed()

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (zeroed, so a stale index could only ever read no adapter)."""
        slot = self._slot_of.pop(name)
        for module_name in self._modules_of.pop(name):
            self._layers[module_name].clear(slot)
        self._free.append(slot)
        self._changed()

    def _layer(self, module_name: str) -> StackedLoraLinear:
        layer = self._layers.get(module_name)
        if layer is None:
            parent_name, _, child = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            layer = StackedLoraLinear(getattr(parent, child), self.rows, self.capacity)
            setattr(parent, child, layer)
            self._layers[module_name] = layer
        return layer

    def _changed(self) -> None:
        self._version += 1

    def select(self, names: Sequence[str]) -> RowSelection:
        """The selection of rows whose adapters are ``names`` (`BASE_ADAPTER`: none), one per row.

        Call it when a set of rows forms (not per step) and run its forwards with `use`.

        Raises:
            RoutingError: a name is not loaded in the stacked layers.
        """
        selection = RowSelection(tuple(names))
        self._index(selection)
        return selection

    def use(self, selection: RowSelection, tokens_per_row: int) -> None:
        """Run the next forward with ``selection``; ``tokens_per_row``: the tokens each row feeds it.

        Per step this is two assignments; only after an adapter was loaded or unloaded since
        the selection was made (a slab changed) are its index and gathered rows rebuilt.
        """
        self.rows.current = self._fresh(selection)
        self.rows.tokens_per_row = max(tokens_per_row, 1)

    def use_flat(self, decode: RowSelection, group: RowSelection, *, width: int, real: torch.Tensor | None) -> None:
        """Run the next forward on a fused forward's flat row (see `FlatRows`).

        Args:
            decode: the running batch's selection (one decode token per row leads the flat row).
            group: the prefill group's selection, whose chunk of ``width`` columns follows.
            real: where the chunk's real tokens lie (flat indices into ``rows * width``), None: all of it.
        """
        self.rows.current = FlatRows(self._fresh(decode), self._fresh(group), len(decode.names), len(group.names), width, real)

    def _fresh(self, selection: RowSelection) -> RowSelection:
        """``selection``, re-indexed (and its gathered rows dropped) if a slab changed since it was indexed."""
        if selection.version != self._version:
            self._index(selection)
        return selection

    def _index(self, selection: RowSelection) -> None:
        try:
            slots = [0 if n == BASE_ADAPTER else self._slot_of[n] for n in selection.names]
        except KeyError as exc:
            raise RoutingError(f"adapter {exc.args[0]} is not loaded in the stacked layers") from None
        selection.index = torch.tensor(slots, dtype=torch.long, device=self._device)
        selection.slots = frozenset(slots) - {0}
        selection.gathered.clear()
        selection.version = self._version

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold a run of forwards; the selection is dropped on the way out, however the run ends."""
        try:
            yield
        finally:
            self.rows.current = None


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers, stacked layers removed.

    PEFT injects its layers into the model it is given; handing it this copy keeps those
    layers out of the model the stacked path runs, at the cost of the module objects only.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        if isinstance(module, StackedLoraLinear):
            memo[id(module)] = copy.deepcopy(module.base_layer, memo)
    return copy.deepcopy(model, memo)
