"""Turn each row's generated tokens into streamed text and decide when the row ends.

Decoding everything generated so far and emitting the new suffix keeps multi-byte
characters whole (byte-level BPE tokens are not valid UTF-8 on their own); text that could
still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Any

from serving.engine.base import Chunk, FinishReason, TokenLogprobs
from serving.engine.request import Request


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin one of ``stops``."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Detokenizer:
    """Streams text and applies stop rules (eos, adapter and request stop ids, stop strings, limits).

    Args:
        tokenizer: the model's tokenizer.
        eos_ids: the model's own stop tokens (its generation_config), always honoured.
        max_context: the model's context window, or None when unknown.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int], max_context: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context

    def advance(
        self, r: Request, token: int, outbox: list[tuple[Request, Chunk]], report: TokenLogprobs | None = None
    ) -> bool:
        """Record ``token`` for ``r``, queue any safe new text in ``outbox``; True when ``r`` finished."""
        r.out_ids.append(token)
        r.pending_ids.append(token)
        if report is not None:
            r.pending_logprobs.append(report)
        logprobs = r.pending_logprobs if r.params.logprobs is not None else None
        text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
        stops = r.params.stop
        reason: FinishReason | None = None
        end = len(text)
        if stops:
            hits = [i for i in (text.find(s, r.emitted) for s in stops) if i >= 0]
            if hits:
                reason, end = "stop", min(hits)
        if reason is None:
            if token in self.eos_ids or token in r.stop_ids or token in r.params.stop_token_ids:
                reason = "stop"
            elif len(r.out_ids) >= r.params.max_tokens:
                reason = "length"
            elif self.max_context is not None and len(r.prompt_ids) + len(r.out_ids) >= self.max_context:
                reason = "length"
        if reason is not None:
            r.done = True
            outbox.append((r, Chunk(text[r.emitted : max(end, r.emitted)], r.pending_ids, reason, logprobs)))
            return True
        # Hold back an incomplete character and anything that may grow into a stop string.
        safe = len(text.rstrip("\ufffd"))
        if stops:
            safe -= stop_holdback(text[:safe], stops)
        if safe > r.emitted:
            outbox.append((r, Chunk(text[r.emitted : safe], r.pending_ids, logprobs=logprobs)))
            r.pending_ids = []
            r.pending_logprobs = []
            r.emitted = safe
        return False
