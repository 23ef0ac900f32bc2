"""Row surgery on a left-padded batch KV cache: join rows, drop rows, trim padding columns.

The running batch keeps one transformers `DynamicCache` whose rows are left-padded to a
common width, with a 2-D attention mask marking each row's real columns. Because padding
is only ever on the left, a row's real tokens stay contiguous, so column distances equal
position distances and sliding-window masks computed over columns stay right (the cache is
built without sliding-window layers, which would crop columns row-blind).
"""

from __future__ import annotations

from typing import Any


class UnsplicableCacheError(TypeError):
    """The model filled its cache with layers whose rows cannot be joined (not plain `DynamicLayer`s)."""


def new_cache() -> Any:
    """An empty cache of plain full-length layers (no config: no row-blind sliding-window cropping)."""
    from transformers import DynamicCache

    return DynamicCache()


def check_splicable(cache: Any) -> None:
    """Raise `UnsplicableCacheError` unless every layer of ``cache`` is a plain `DynamicLayer`."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsplicableCacheError(f"{type(cache).__name__} has no per-layer key/value tensors")
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise UnsplicableCacheError(f"cache layer {type(layer).__name__} cannot be joined row-wise")


def _pad_left(t: Any, columns: int, dim: int) -> Any:
    import torch

    if columns == 0:
        return t
    shape = list(t.shape)
    shape[dim] = columns
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(cache: Any, mask: Any, other: Any, other_mask: Any) -> Any:
    """Append ``other``'s rows to ``cache`` (in place) and return the joined mask.

    The narrower of the two is left-padded with zero keys/values and zero mask columns.
    """
    import torch

    width, other_width = mask.shape[1], other_mask.shape[1]
    target = max(width, other_width)
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, target - width, 2), _pad_left(extra.keys, target - other_width, 2)])
        layer.values = torch.cat(
            [_pad_left(layer.values, target - width, 2), _pad_left(extra.values, target - other_width, 2)]
        )
    return torch.cat([_pad_left(mask, target - width, 1), _pad_left(other_mask, target - other_width, 1)])


def select(cache: Any, mask: Any, keep: list[int]) -> Any:
    """Keep only rows ``keep`` of ``cache`` (in place), drop all-padding leading columns; return the mask."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    return trim(cache, mask)


def trim(cache: Any, mask: Any) -> Any:
    """Drop the leading columns that are padding in every row (in place); return the mask."""
    leading = int(mask.argmax(dim=1).min().item())  # first real column of the row that starts earliest
    if leading == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, leading:, :]
        layer.values = layer.values[:, :, leading:, :]
    return mask[:, leading:]
