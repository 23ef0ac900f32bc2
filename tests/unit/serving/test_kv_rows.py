"""Row surgery on the batch KV cache: growable layers append in place and agree with transformers' `DynamicLayer`."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
from transformers import DynamicCache  # noqa: E402

from serving.engine.kv_rows import growable_layer, join, new_cache, select  # noqa: E402

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


def _same(a: Any, b: Any) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys)
        assert torch.equal(la.values, lb.values)


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

    # The two wider rows leave: the columns that are padding in every remaining row go.
    kept, kept_plain = select(ours, joined, [0, 1, 4]), select(plain, joined, [0, 1, 4])
    assert torch.equal(kept, kept_plain)
    _same(ours, plain)
    assert kept.shape[1] == 9 and ours.get_seq_length() == 9
    kept, kept_plain = select(ours, kept, [0, 1]), select(plain, kept_plain, [0, 1])
    assert torch.equal(kept, kept_plain)
    assert kept.shape[1] == 6
    _same(ours, plain)

    buffer = ours.layers[0]._kbuf.data_ptr()
    _fill(ours, 2, 1, seed=3)
    _fill(plain, 2, 1, seed=3)
    _same(ours, plain)
    assert ours.layers[0]._kbuf.data_ptr() == buffer  # spare columns survived the join, the leave and the trim
