"""Row surgery on a left-padded batch KV cache: join rows, drop rows, trim padding columns.

The running batch keeps one transformers `DynamicCache` whose rows are left-padded to a
common width, with a 2-D attention mask marking each row's real columns. Because padding
is only ever on the left, a row's real tokens stay contiguous, so column distances equal
position distances and sliding-window masks computed over columns stay right (the cache is
built without sliding-window layers, which would crop columns row-blind).

The cache's layers are `GrowableLayer`s: their keys and values are views of buffers with
spare columns, so a decode step writes its column in place instead of transformers'
`DynamicLayer` concatenating it onto a copy of the whole layer every step; joins allocate the
joined buffers with spare columns, leaves keep them, and trimming padding is a view.
"""

from __future__ import annotations

import functools
from typing import Any


class UnsplicableCacheError(TypeError):
    """The model filled its cache with layers whose rows cannot be joined (not plain `DynamicLayer`s)."""


SPARE_COLUMNS = 64
"""Least spare columns a grown layer keeps, so a decode step appends in place (see `GrowableLayer`)."""

SPARE_ROWS = 8
"""Least spare rows a joined layer keeps, so rows joining later are written in place."""


def _append(buffer: Any, rows: int, used: int, new: Any) -> tuple[Any, int]:
    """Write ``new`` after the first ``used`` columns of ``buffer``'s first ``rows`` rows, growing it
    (with columns to spare, keeping its spare rows) if full; return the buffer and the columns used."""
    columns = new.shape[-2]
    total = used + columns
    if buffer is None or buffer.shape[-2] < total or rows != new.shape[0]:
        capacity = buffer.shape[0] if buffer is not None and rows == new.shape[0] else new.shape[0]
        grown = new.new_empty((capacity, new.shape[1], total + max(SPARE_COLUMNS, total // 2), new.shape[-1]))
        if used and rows == new.shape[0]:
            grown[:rows, :, :used] = buffer[:rows, :, :used]
        buffer = grown
    buffer[: new.shape[0], :, used:total] = new
    return buffer, total


def _growable_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        """A `DynamicLayer` whose decode steps append in place instead of concatenating.

        transformers' `DynamicLayer.update` concatenates each step's column onto the whole
        layer (a copy of every row's keys and values per layer per step); here keys and
        values are views of the first ``rows`` rows and ``used`` columns of buffers with spare
        rows and columns, so a step writes one column, a joining row is written into a spare
        row, and a copy happens only when a buffer is full (amortised; `SPARE_COLUMNS`).
        Assigning ``keys``/``values`` (transformers' own code) replaces the buffer.
        """

        _kbuf: Any = None
        _vbuf: Any = None
        _rows = 0
        _kused = 0
        _vused = 0

        @property  # type: ignore[override]
        def keys(self) -> Any:
            return None if self._kbuf is None else self._kbuf[: self._rows, :, : self._kused]

        @keys.setter
        def keys(self, value: Any) -> None:
            usable = value is not None and value.dim() == 4
            self._kbuf, self._kused = (value, value.shape[-2]) if usable else (None, 0)
            self._rows = value.shape[0] if usable else 0

        @property  # type: ignore[override]
        def values(self) -> Any:
            return None if self._vbuf is None else self._vbuf[: self._rows, :, : self._vused]

        @values.setter
        def values(self, value: Any) -> None:
            usable = value is not None and value.dim() == 4
            self._vbuf, self._vused = (value, value.shape[-2]) if usable else (None, 0)
            self._rows = value.shape[0] if usable else 0

        def get_seq_length(self) -> int:
            return self._kused if self.is_initialized else 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._kbuf, self._kused = _append(self._kbuf, self._rows, self._kused, key_states)
            self._vbuf, self._vused = _append(self._vbuf, self._rows, self._vused, value_states)
            self._rows = key_states.shape[0]
            return self.keys, self.values

        def keep_rows(self, order: list[int]) -> None:
            """Row ``i`` becomes old row ``order[i]``: only the rows that move are copied (see `select`)."""
            import torch

            if self._kbuf is None:
                return
            moves = [(i, src) for i, src in enumerate(order) if i != src]
            if moves:
                dst = self._kbuf.new_tensor([i for i, _ in moves], dtype=torch.long)
                src = self._kbuf.new_tensor([j for _, j in moves], dtype=torch.long)
                self._kbuf[dst] = self._kbuf[src]
                self._vbuf[dst] = self._vbuf[src]
            self._rows = len(order)  # the rows past it stay as spare rows

        def batch_select_indices(self, indices: Any) -> None:
            # Select from the whole buffers: the spare columns stay (one copy, not two).
            if self._kbuf is not None:
                self._kbuf = self._kbuf[: self._rows].index_select(0, indices)
                self._vbuf = self._vbuf[: self._rows].index_select(0, indices)
                self._rows = self._kbuf.shape[0]

        def drop_leading(self, columns: int) -> None:
            """Forget the first ``columns`` columns (a view: the spare columns stay)."""
            self._kbuf, self._kused = self._kbuf[:, :, columns:], self._kused - columns
            self._vbuf, self._vused = self._vbuf[:, :, columns:], self._vused - columns

        def add_rows(self, keys: Any, values: Any) -> bool:
            """Write rows no wider than this layer into its spare rows, right-aligned (left padding
            zeroed); False when there are too few spare rows or the rows are wider."""
            rows, width = keys.shape[0], keys.shape[2]
            if self._kbuf is None or self._rows + rows > self._kbuf.shape[0] or width > self._kused:
                return False
            for buffer, new in ((self._kbuf, keys), (self._vbuf, values)):
                region = buffer[self._rows : self._rows + rows, :, : self._kused]
                region[:, :, : self._kused - width] = 0  # masked out, but never garbage (NaN * 0 is NaN)
                region[:, :, self._kused - width :] = new
            self._rows += rows
            return True

        def replace(self, keys: Any, values: Any, rows: int, used: int) -> None:
            """Take buffers whose first ``rows`` rows and ``used`` columns are this layer's keys and values."""
            self._kbuf, self._vbuf, self._rows, self._kused, self._vused = keys, values, rows, used, used
            self.is_initialized = True

    return GrowableLayer


@functools.cache
def growable_layer() -> type:
    """The `GrowableLayer` class (built on first use: transformers is imported lazily)."""
    return _growable_layer_class()


def new_cache() -> Any:
    """An empty cache of full-length growable layers (no config: no row-blind sliding-window cropping)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = growable_layer()
    return cache


def check_splicable(cache: Any) -> None:
    """Raise `UnsplicableCacheError` unless every layer of ``cache`` is a plain (or growable) `DynamicLayer`."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsplicableCacheError(f"{type(cache).__name__} has no per-layer key/value tensors")
    for layer in layers:
        if type(layer) not in (DynamicLayer, growable_layer()):
            raise UnsplicableCacheError(f"cache layer {type(layer).__name__} cannot be joined row-wise")


def _pad_left(t: Any, columns: int, dim: int) -> Any:
    import torch

    if columns == 0:
        return t
    shape = list(t.shape)
    shape[dim] = columns
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _joined(ours: Any, theirs: Any, target: int, spare: int) -> Any:
    """``ours`` rows then ``theirs``, each right-aligned to ``target`` columns, in a buffer with
    ``spare`` more columns and spare rows."""
    rows = ours.shape[0] + theirs.shape[0]
    out = ours.new_zeros((rows + max(SPARE_ROWS, rows // 2), ours.shape[1], target + spare, ours.shape[3]))
    out[: ours.shape[0], :, target - ours.shape[2] : target] = ours
    out[ours.shape[0] : rows, :, target - theirs.shape[2] : target] = theirs
    return out


def join(cache: Any, mask: Any, other: Any, other_mask: Any) -> Any:
    """Append ``other``'s rows to ``cache`` (in place) and return the joined mask.

    The narrower of the two is left-padded with zero keys/values and zero mask columns.
    """
    import torch

    width, other_width = mask.shape[1], other_mask.shape[1]
    target = max(width, other_width)
    growable = growable_layer()
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if type(layer) is growable:
            if layer.add_rows(extra.keys, extra.values):
                continue  # into spare rows: no copy of the batch's rows
            spare = max(SPARE_COLUMNS, target // 2)
            keys = _joined(layer.keys, extra.keys, target, spare)
            layer.replace(keys, _joined(layer.values, extra.values, target, spare), layer.keys.shape[0] + extra.keys.shape[0], target)
            continue
        layer.keys = torch.cat([_pad_left(layer.keys, target - width, 2), _pad_left(extra.keys, target - other_width, 2)])
        layer.values = torch.cat(
            [_pad_left(layer.values, target - width, 2), _pad_left(extra.values, target - other_width, 2)]
        )
    return torch.cat([_pad_left(mask, target - width, 1), _pad_left(other_mask, target - other_width, 1)])


def fill_order(rows: int, keep: list[int]) -> list[int]:
    """The new row order after keeping ``keep`` (ascending) of ``rows``: kept rows past the new
    end move into the holes that leaving rows open, the others stay where they are."""
    kept = set(keep)
    holes = [i for i in range(len(keep)) if i not in kept]
    movers = [k for k in keep if k >= len(keep)]
    order = list(range(len(keep)))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order


def select(cache: Any, mask: Any, keep: list[int]) -> tuple[Any, list[int]]:
    """Keep only rows ``keep`` of ``cache`` (in place), drop all-padding leading columns.

    Returns the mask and the rows' new order (old row indices; the caller reorders its own
    per-row state the same way). Growable layers move only the rows past the new end into
    the leaving rows' places instead of copying every row (`fill_order`).
    """
    import torch

    growable = growable_layer()
    order = fill_order(mask.shape[0], keep) if all(type(layer) is growable for layer in cache.layers) else keep
    index = torch.tensor(order, dtype=torch.long, device=mask.device)
    for layer in cache.layers:
        if type(layer) is growable:
            layer.keep_rows(order)
        else:
            layer.batch_select_indices(index)
    mask = mask.index_select(0, index)
    return trim(cache, mask), order


def trim(cache: Any, mask: Any) -> Any:
    """Drop the leading columns that are padding in every row (in place); return the mask."""
    leading = int(mask.argmax(dim=1).min().item())  # first real column of the row that starts earliest
    if leading == 0:
        return mask
    growable = growable_layer()
    for layer in cache.layers:
        if type(layer) is growable:
            layer.drop_leading(leading)
            continue
        layer.keys = layer.keys[:, :, leading:, :]
        layer.values = layer.values[:, :, leading:, :]
    return mask[:, leading:]
