"""One forward for a decode step and a joining group's prefill chunk (a ragged batch).

Every forward pays a fixed cost besides its tokens' work (on a CPU: streaming the weights
once, and the model's Python; a 1-row decode step of the `small` benchmark model costs as
much as ~15 prompt columns). When a prefill group's chunk and the running batch's decode
step are both due, `fused_forward` runs them as one: the tokens of both are laid out in one
flat row (the decode tokens first, then the real tokens of the group's chunk row after row,
its left padding left out), so the
linear layers, MLP, norms and rotary embeddings (per-token ``position_ids``) see every token
once, and only attention is split by part. It is transformers' own hook for this, an
attention function registered with `AttentionInterface` (as its continuous batching's
paged attention is) and selected on the model's config for the fused forward only:

- `FusedCache` is the forward's cache: each attention layer's ``update`` writes the decode
  tokens' keys/values into the running batch's cache (one column per row) and the group's
  into the group's cache, left-padded again (zeros where the separate forward wrote padding's,
  which the mask hides either way);
- `fused_attention` then runs SDPA for the decode part against the batch cache under the
  batch's padding mask, and for the group against the group cache under its causal+padding
  mask (and a layer's sliding window, which it is passed), and puts the outputs back in
  token order;
- ``logits_to_keep`` (a 1-D tensor of indices) keeps each decode row's column and, on the
  group's last chunk, each group row's last column.

Where it is used is decided once at load (`fused_support`): the model must take transformers'
attention interface and ``logits_to_keep``, and a probe runs the fused forward on a small
synthetic batch against the two separate forwards and must match them (so a family whose
attention needs something this function does not apply, e.g. Gemma-2's logit soft-capping
or GPT-OSS's sinks, is refused by the probe instead of served wrongly). Engines that serve
adapters fuse too: ``layout`` hands the flat row's layout (the `FusedCache`) to the stacked
multi-LoRA layers, which apply each decode row's adapter to its token and each group row's
to its chunk (`multi_lora.FlatRows`); an exclusive (PEFT) batch keeps two forwards.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

NAME = "forgeline_fused"
"""The attention implementation's name in transformers' `AttentionInterface`."""

PLAN_KWARG = "forgeline_fused"
"""The forward keyword that carries the `FusedCache` down to `fused_attention`."""

_IGNORED = {"position_ids", "use_cache", "cache_position", "output_attentions", "head_mask", "is_causal", PLAN_KWARG}
"""Keywords models pass to attention functions that change nothing here (when None or False, except ours);
any other that is set (``softcap``, ``s_aux``...) makes `fused_attention` refuse."""

FusedForward = Callable[..., tuple[Any, Any]]
"""``(decode_ids, decode_mask, decode_positions, batch_cache, group_ids, group_mask, group_positions,
group_cache, group_logits, decode_names, group_names) -> (decode logits, group last-column logits or
None)``, as float32; the names are each row's adapter, as for a `scheduler.Forward` (empty without adapters)."""


@functools.cache
def _cache_class() -> type:
    from transformers.cache_utils import Cache

    class FusedCache(Cache):
        """The fused forward's cache: routes each layer's new keys/values to the two real caches.

        Args:
            batch: the running batch's cache (``decode`` rows, one new column each).
            batch_mask: (decode, columns) the batch's padding mask, the new column included.
            group: the prefill group's cache.
            group_mask: (rows, columns) the group's padding mask up to the chunk's end.
            decode: rows of the running batch (the first ``decode`` tokens of the flat row).
            rows, width: the group's rows and chunk width.
            real: where the group's real tokens (the rest of the flat row, row after row) lie in its
                ``rows * width`` chunk (flat indices), or None when the chunk has no padding.
        """

        def __init__(
            self,
            batch: Any,
            batch_mask: Any,
            group: Any,
            group_mask: Any,
            decode: int,
            rows: int,
            width: int,
            real: Any = None,
        ) -> None:
            super().__init__(layers=[])
            self.batch, self.group = batch, group
            self.decode, self.rows, self.width, self.real = decode, rows, width, real
            self._batch_mask = batch_mask.bool()[:, None, None, :]  # (decode, 1, 1, columns)
            self._group_padding = group_mask.bool()[:, None, None, :]  # (rows, 1, 1, columns)
            self._masks: dict[int | None, tuple[Any, Any]] = {}

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return max(self.batch.get_seq_length(layer_idx), self.group.get_seq_length(layer_idx))

        def update(
            self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[Any, Any]:
            # (1, kv_heads, tokens, head_dim): the decode tokens, then the group's real tokens.
            for cache, part in ((self.batch, self.decode_part), (self.group, self.group_part)):
                cache.update(part(key_states), part(value_states), layer_idx)
            return key_states, value_states

        def decode_part(self, x: Any) -> Any:
            """(1, heads, tokens, dim) -> the decode rows' (decode, heads, 1, dim)."""
            return x[0, :, : self.decode].unsqueeze(2).transpose(0, 1)

        def group_part(self, x: Any) -> Any:
            """(1, heads, tokens, dim) -> the group's left-padded (rows, heads, width, dim), zero at padding."""
            heads, dim = x.shape[1], x.shape[3]
            part = x[0, :, self.decode :]
            if self.real is not None:
                padded = part.new_zeros((heads, self.rows * self.width, dim))
                padded[:, self.real] = part
                part = padded
            return part.reshape(heads, self.rows, self.width, dim).transpose(0, 1)

        def packed(self, group_out: Any) -> Any:
            """The group's attention output (rows, width, heads, dim) -> its real tokens' (tokens, heads, dim)."""
            out = group_out.reshape(self.rows * self.width, *group_out.shape[2:])
            return out if self.real is None else out[self.real]

        def masks(self, window: int | None) -> tuple[Any, Any]:
            """The decode part's and the group's boolean attention masks (with a sliding ``window``)."""
            if window not in self._masks:
                import torch

                batch, padding = self._batch_mask, self._group_padding
                device = padding.device
                columns = torch.arange(padding.shape[-1], device=device)
                queries = columns[-self.width :]  # the chunk's own columns
                causal = columns[None, :] <= queries[:, None]
                if window is not None:
                    causal = causal & (queries[:, None] - columns[None, :] < window)
                    near = torch.arange(batch.shape[-1], device=device) > batch.shape[-1] - 1 - window
                    batch = batch & near
                # A padding query (zeros, its output dropped) sees itself, so no row is all masked
                # and SDPA gives no NaN.
                group = (padding & causal) | (columns[None, :] == queries[:, None])
                self._masks[window] = (batch, group)
            return self._masks[window]

    return FusedCache


def fused_cache(*args: Any) -> Any:
    """A `FusedCache` (the class is built on first use: transformers is imported lazily)."""
    return _cache_class()(*args)


def fused_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention of the fused forward: the decode part over the batch cache, the group over its own.

    ``query`` is (1, heads, tokens, head_dim) in the flat row's order; the keys and values come
    from the two caches `FusedCache.update` just wrote (``key``/``value`` are the new tokens only).
    Raises NotImplementedError for anything it would not apply (the load-time probe refuses the model).
    """
    import torch

    plan = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise NotImplementedError(f"the `{NAME}` attention runs only inside `fused_forward`")
    window = kwargs.get("sliding_window")
    unknown = sorted(
        k for k, v in kwargs.items() if k not in _IGNORED and k != "sliding_window" and v is not None and v is not False
    )
    if unknown or dropout or kwargs.get("output_attentions") or kwargs.get("head_mask") is not None:
        raise NotImplementedError(f"the fused step does not apply {unknown or 'dropout/attention outputs'}")
    batch_mask, group_mask = plan.masks(window)
    layer = module.layer_idx
    out = []
    for cache, mask, part in ((plan.batch, batch_mask, plan.decode_part), (plan.group, group_mask, plan.group_part)):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        o = torch.nn.functional.scaled_dot_product_attention(
            part(query), keys, values, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
        )
        out.append(o.transpose(1, 2))  # (rows, columns, heads, dim)
    decode, group = out
    return torch.cat([decode.reshape(-1, *decode.shape[2:]), plan.packed(group)]).unsqueeze(0), None


def register() -> None:
    """Make `fused_attention` known to transformers under `NAME` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, fused_attention)


def fused_forward(
    model: Any,
    cache_kwarg: str,
    decode_ids: Any,
    decode_mask: Any,
    decode_positions: Any,
    batch_cache: Any,
    group_ids: Any,
    group_mask: Any,
    group_positions: Any,
    group_cache: Any,
    group_logits: bool,
    layout: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    """Run the running batch's decode step and a group's prefill chunk as one forward.

    Args:
        model: a causal LM for which `fused_support` returned None.
        cache_kwarg: the forward's name for its cache argument.
        decode_ids, decode_positions: (decode, 1) the running rows' last tokens and their positions.
        decode_mask: (decode, columns) the batch's mask, the new column included.
        batch_cache: the running batch's cache.
        group_ids, group_positions: (rows, width) the group's left-padded chunk and its positions
            (only its real tokens enter the forward).
        group_mask: (rows, columns) the group's mask up to the chunk's end.
        group_cache: the group's cache.
        group_logits: whether to return the group's last-column logits (its last chunk).
        layout: called with the flat row's `FusedCache` (``decode``, ``rows``, ``width``, ``real``)
            before the forward: where per-row state (stacked LoRA rows) learns which token is whose.

    Returns:
        (decode, vocab) logits, and (rows, vocab) logits or None, as float32.
    """
    import torch

    d = decode_ids.shape[0]
    r, w = group_ids.shape
    # The group's left padding stays out of the flat row (its keys/values are zeros in the cache, masked).
    chunk = group_mask[:, -w:].bool()
    real = None if bool(chunk.all()) else chunk.reshape(-1).nonzero().squeeze(1)
    group_ids, group_positions = group_ids.reshape(-1), group_positions.reshape(-1)
    if real is not None:
        group_ids, group_positions = group_ids[real], group_positions[real]
    ids = torch.cat([decode_ids.reshape(-1), group_ids]).unsqueeze(0)
    positions = torch.cat([decode_positions.reshape(-1), group_positions]).unsqueeze(0)
    keep = torch.arange(d, device=ids.device)
    if group_logits:  # each row's last column is real on the last chunk
        keep = torch.cat([keep, d - 1 + chunk.sum(1).cumsum(0)])
    plan = fused_cache(batch_cache, decode_mask, group_cache, group_mask, d, r, w, real)
    if layout is not None:
        layout(plan)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        out = model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{cache_kwarg: plan, PLAN_KWARG: plan},
        )
    finally:
        config._attn_implementation = previous
    logits = out.logits[0].float()
    return logits[:d], (logits[d:] if group_logits else None)


def fused_support(model: Any, cache_kwarg: str, device: Any) -> str | None:
    """None when `fused_forward` is exactly right for ``model``; otherwise why not (for the log).

    Besides the static checks, a probe compares the fused forward with the two separate forwards
    it replaces on a small synthetic batch (left padding on both sides, a second decode step
    afterwards to check what each cache received).
    """
    import inspect

    import torch

    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take transformers' attention interface"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no `logits_to_keep`"
    register()
    try:
        worst = _probe(model, cache_kwarg, device)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the two forwards
        return f"the fused forward failed on a probe batch: {type(exc).__name__}: {exc}"
    # float32 agrees to rounding; half precision differs in the last bits with the GEMMs' shapes.
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if worst > tolerance:
        return f"the fused forward differs from the separate forwards on a probe batch (logits by {worst:.2g})"
    return None


def _probe(model: Any, cache_kwarg: str, device: Any) -> float:
    """The largest logit difference (relative to the logits' scale) of fused against separate forwards."""
    import torch

    from serving.engine.kv_rows import new_cache

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)

    def batch(lengths: list[int]) -> tuple[Any, Any, Any]:
        width = max(lengths)
        ids = torch.randint(3, min(vocab, 200), (len(lengths), width), generator=gen)
        mask = torch.zeros((len(lengths), width), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), positions.to(device)

    def forward(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        )
        return out.logits[:, -1].float()

    running, group = batch([6, 3]), batch([5, 2, 4])
    step, second = torch.randint(3, min(vocab, 200), (2, 2), generator=gen).to(device).unbind(1)
    results = []
    with torch.inference_mode():
        for fused in (False, True):
            ids, mask, positions = running
            cache, grp_cache = new_cache(), new_cache()
            forward(ids, mask, positions, cache)
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            next_pos = positions[:, -1:] + 1
            if fused:
                dec, grp = fused_forward(
                    model, cache_kwarg, step[:, None], mask, next_pos, cache, *group, grp_cache, True
                )
            else:
                dec = forward(step[:, None], mask, next_pos, cache)
                grp = forward(group[0], group[1], group[2], grp_cache)
            # What the caches received: one more separate step of each.
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            dec2 = forward(second[:, None], mask, next_pos + 1, cache)
            gmask = torch.cat([group[1], group[1].new_ones((3, 1))], dim=1)
            grp2 = forward(step.new_tensor([[5], [6], [7]]), gmask, group[2][:, -1:] + 1, grp_cache)
            results.append([dec, grp, dec2, grp2])
    worst = 0.0
    for a, b in zip(*results, strict=True):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp(min=1.0)))
    return worst
