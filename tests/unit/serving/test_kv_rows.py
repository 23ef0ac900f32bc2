"""Row surgery on the batch KV cache: growable layers append in place and agree with transformers' `DynamicLayer`."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
from transformers import DynamicCache  # noqa: E402

from serving.engine.kv_rows import fill_order, growable_layer, join, new_cache, select  # noqa: E402

LAYERS = 2


def _fill(cache: Any, rows: int, columns: int, seed: int) -> Any:
    """Feed ``columns`` random key/value columns of ``rows`` rows into every layer; return the list fed."""
    g = torch.Generator().manual_seed(seed)
    fed = []
    for layer in range(LAYERS):
        k = torch.randn(rows, 2, columns, 4, generator=g)
        v = torch.randn(rows, 2, columns, 4, generator=g)
        cache.update(k, v, layer)
        fed.append((k, v))
    return fed


def _same(a: Any, b: Any, order: list[int] | None = None) -> None:
    """Equal layers; with ``order``, ``a``'s rows are ``b``'s in that order."""
    for la, lb in zip(a.layers, b.layers, strict=True):
        index = torch.tensor(order if order is not None else range(lb.keys.shape[0]))
        assert torch.equal(la.keys, lb.keys[index])
        assert torch.equal(la.values, lb.values[index])


def test_a_decode_step_writes_in_place_and_returns_what_concatenation_would() -> None:
    ours, plain = new_cache(), DynamicCache()
    _fill(ours, 3, 5, seed=0)
    _fill(plain, 3, 5, seed=0)
    buffer = ours.layers[0]._kbuf.data_ptr()
    for step in range(10):
        _fill(ours, 3, 1, seed=step + 1)
        _fill(plain, 3, 1, seed=step + 1)
        _same(ours, plain)
    assert type(ours.layers[0]) is growable_layer()
    assert ours.layers[0]._kbuf.data_ptr() == buffer  # no copy: the column went into the spare room
    assert ours.get_seq_length() == plain.get_seq_length() == 15


def test_join_select_and_trim_agree_with_plain_layers_and_keep_spare_columns() -> None:
    ours, plain = new_cache(), DynamicCache()
    _fill(ours, 2, 6, seed=1)
    _fill(plain, 2, 6, seed=1)
    mask = torch.ones(2, 6, dtype=torch.long)
    other_ours, other_plain = new_cache(), DynamicCache()
    _fill(other_ours, 3, 9, seed=2)
    _fill(other_plain, 3, 9, seed=2)
    other_mask = torch.ones(3, 9, dtype=torch.long)

    joined = join(ours, mask, other_ours, other_mask)
    assert torch.equal(joined, join(plain, mask, other_plain, other_mask))
    _same(ours, plain)
    assert joined.shape == (5, 9) and joined[:2, :3].sum() == 0  # the narrower rows are left-padded

    # Rows 2 and 3 leave: row 4 moves into row 2's place, nothing else is copied.
    kept, order = select(ours, joined, [0, 1, 4])
    assert order == [0, 1, 4]
    kept_plain, _ = select(plain, joined, [0, 1, 4])
    assert torch.equal(kept, kept_plain)
    _same(ours, plain)
    assert kept.shape[1] == 9 and ours.get_seq_length() == 9
    # Row 0 leaves: the last (wide) row takes its place.
    kept, order = select(ours, kept, [1, 2])
    assert order == [2, 1]
    kept_plain, plain_order = select(plain, kept_plain, [1, 2])
    assert plain_order == [1, 2]
    assert torch.equal(kept, kept_plain[[1, 0]])
    assert kept.shape[1] == 9
    _same(ours, plain, order=[1, 0])
    # The wide row leaves: the three columns that are padding in the narrow one go (a view).
    kept, order = select(ours, kept, [1])
    kept_plain, _ = select(plain, kept_plain, [0])
    assert order == [1] and torch.equal(kept, kept_plain) and kept.shape[1] == 6
    _same(ours, plain)

    buffer = ours.layers[0]._kbuf.data_ptr()
    _fill(ours, 1, 1, seed=3)
    _fill(plain, 1, 1, seed=3)
    _same(ours, plain)
    assert ours.layers[0]._kbuf.data_ptr() == buffer  # spare columns survived the join, the leave and the trim


@pytest.mark.parametrize(
    ("rows", "keep", "order"),
    [(4, [0, 1, 2, 3], [0, 1, 2, 3]), (4, [0, 2], [0, 2]), (4, [1, 3], [3, 1]), (5, [0, 3, 4], [0, 3, 4]), (5, [2, 4], [2, 4]), (5, [0, 1, 4], [0, 1, 4]), (3, [2], [2])],
)
def test_fill_order_moves_only_rows_past_the_new_end(rows: int, keep: list[int], order: list[int]) -> None:
    assert fill_order(rows, keep) == order


def test_a_narrower_group_joins_into_spare_rows_without_copying_the_batch() -> None:
    ours, plain = new_cache(), DynamicCache()
    _fill(ours, 2, 6, seed=4)
    _fill(plain, 2, 6, seed=4)
    mask = torch.ones(2, 6, dtype=torch.long)
    wide_ours, wide_plain = new_cache(), DynamicCache()
    _fill(wide_ours, 1, 8, seed=5)
    _fill(wide_plain, 1, 8, seed=5)
    mask = join(ours, mask, wide_ours, torch.ones(1, 8, dtype=torch.long))  # wider: a new buffer with spare rows
    plain_mask = join(plain, torch.ones(2, 6, dtype=torch.long), wide_plain, torch.ones(1, 8, dtype=torch.long))
    buffer = ours.layers[0]._kbuf.data_ptr()
    narrow_ours, narrow_plain = new_cache(), DynamicCache()
    _fill(narrow_ours, 2, 3, seed=6)
    _fill(narrow_plain, 2, 3, seed=6)
    mask = join(ours, mask, narrow_ours, torch.ones(2, 3, dtype=torch.long))
    plain_mask = join(plain, plain_mask, narrow_plain, torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(mask, plain_mask) and mask.shape == (5, 8)
    _same(ours, plain)
    assert ours.layers[0]._kbuf.data_ptr() == buffer  # written into spare rows
    _fill(ours, 5, 1, seed=7)
    _fill(plain, 5, 1, seed=7)
    _same(ours, plain)
