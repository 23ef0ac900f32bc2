"""Reuse the KV of prompt prefixes seen before (a shared system prompt), keyed by token ids.

Prompts are cut into blocks of ``block`` tokens. Each cached block holds its keys and
values for every layer and is keyed by its parent block and its own token ids (a chain, as
in vLLM's automatic prefix caching), so a lookup walks the prompt block by block and two
prompts share exactly the blocks their token ids share. The adapter a prompt was prefilled
with is the root of the chain: an adapter changes the keys and values. Blocks are evicted
least recently used beyond ``max_tokens``.

A causal model's keys and values at a position depend only on the tokens up to it, so the
cached blocks plus a prefill of the rest give the same cache as a prefill of the whole
prompt (up to float rounding of different matmul shapes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from serving.engine.request import Request

_Key = tuple[int, tuple[int, ...]]


@dataclass
class _Block:
    id: int
    keys: list[Any]  # per layer, (1, heads, block, head_dim)
    values: list[Any]


class PrefixCache:
    """An LRU cache of prompt-prefix KV blocks.

    Args:
        block: tokens per block (only whole blocks are cached and reused).
        max_tokens: most cached tokens; least recently used blocks go first.
    """

    def __init__(self, *, block: int = 16, max_tokens: int = 8192) -> None:
        if block <= 0 or max_tokens < block:
            raise ValueError(f"prefix cache needs block > 0 and max_tokens >= block, got {block} and {max_tokens}")
        self.block = block
        self.capacity = max_tokens // block
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()
        self._roots: dict[str | None, int] = {}
        self._ids: dict[int, _Key] = {}  # block id -> its key, to refresh a found block's recency
        self._next_id = 0
        self.hits = 0  # prompt tokens served from the cache, for metrics and tests
        self.lookups = 0

    def _root(self, adapter: str | None) -> int:
        if adapter not in self._roots:
            self._next_id += 1
            self._roots[adapter] = -self._next_id
        return self._roots[adapter]

    def _walk(self, prompt: list[int], adapter: str | None) -> list[_Block]:
        found: list[_Block] = []
        parent = self._root(adapter)
        b = self.block
        # At least one prompt token is always prefilled: its logits give the first token.
        for start in range(0, len(prompt) - 1 - b + 1, b):
            block = self._blocks.get((parent, tuple(prompt[start : start + b])))
            if block is None:
                break
            found.append(block)
            parent = block.id
        return found

    def hit_length(self, prompt: list[int], adapter: str | None) -> int:
        """Tokens of ``prompt`` a lookup would reuse."""
        return len(self._walk(prompt, adapter)) * self.block

    def lookup(self, prompts: list[list[int]], adapters: list[str | None], length: int) -> Any:
        """A cache holding the first ``length`` tokens of every prompt (rows in order), or None.

        Every prompt must have at least ``length`` cached tokens (see `hit_length`).
        """
        import torch

        from serving.engine.kv_rows import new_cache

        if length == 0:
            return None
        rows = []
        for prompt, adapter in zip(prompts, adapters, strict=True):
            blocks = self._walk(prompt, adapter)[: length // self.block]
            if len(blocks) * self.block != length:
                raise ValueError(f"prompt has only {len(blocks) * self.block} cached tokens, wanted {length}")
            for block in blocks:
                self._blocks.move_to_end(self._key_of(block))
            rows.append(blocks)
        self.lookups += len(prompts)
        self.hits += length * len(prompts)
        cache = new_cache()
        for layer in range(len(rows[0][0].keys)):
            keys = torch.cat([torch.cat([blk.keys[layer] for blk in blocks], dim=2) for blocks in rows])
            values = torch.cat([torch.cat([blk.values[layer] for blk in blocks], dim=2) for blocks in rows])
            cache.update(keys, values, layer)
        return cache

    def _key_of(self, block: _Block) -> _Key:
        return self._ids[block.id]

    def store(self, rows: list[Request], adapters: list[str | None], cache: Any, mask: Any) -> None:
        """Cache the whole prompt blocks of a finished prefill (rows left-padded to ``mask``'s width)."""
        from serving.engine.kv_rows import UnsplicableCacheError, check_splicable

        try:
            check_splicable(cache)
        except UnsplicableCacheError:
            return
        b = self.block
        width = mask.shape[1]
        for i, r in enumerate(rows):
            prompt = r.prompt_ids
            offset = width - len(prompt)  # left padding of this row
            parent = self._root(adapters[i])
            for start in range(0, len(prompt) - b + 1, b):
                key = (parent, tuple(prompt[start : start + b]))
                block = self._blocks.get(key)
                if block is None:
                    lo, hi = offset + start, offset + start + b
                    self._next_id += 1
                    block = _Block(
                        self._next_id,
                        [layer.keys[i : i + 1, :, lo:hi].clone() for layer in cache.layers],
                        [layer.values[i : i + 1, :, lo:hi].clone() for layer in cache.layers],
                    )
                    self._blocks[key] = block
                    self._ids[block.id] = key
                else:
                    self._blocks.move_to_end(key)
                parent = block.id
        while len(self._blocks) > self.capacity:
            key, block = self._blocks.popitem(last=False)
            self._ids.pop(block.id, None)
