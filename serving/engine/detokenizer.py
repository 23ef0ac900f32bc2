"""Turn each row's generated tokens into streamed text and decide when the row ends.

A row's text is what decoding everything generated so far gives; the new suffix is
emitted, except an incomplete multi-byte character at its end (byte-level BPE tokens are not
valid UTF-8 on their own) and text that could still grow into a stop string, which are held
back until they cannot.

Decoding everything at every step costs time linear in the output (16 us per token at 96
tokens, 147 us at 1000 on the `small` benchmark's tokenizer: a quarter of a decode step's
cost per row there). Where it gives the same text, each row keeps a
`tokenizers.decoders.DecodeStream` instead, which decodes only the new token (~1.5 us
whatever the length): a fast tokenizer whose decoder is byte-level (GPT-2, Llama 3, Qwen2...:
the text is the concatenation of the tokens' bytes, so decoding a suffix adds exactly its
bytes) and that cleans up no spaces. Other tokenizers decode everything, as before. The
stream returns nothing while a character is incomplete, which is the text above without its
trailing U+FFFD; the last chunk is cut from one full decode, so it ends exactly as before.
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
        self.stream_backend = _stream_backend(tokenizer)
        """The `tokenizers.Tokenizer` rows decode incrementally with, or None (see the module docstring)."""

    def _text(self, r: Request, token: int) -> str:
        """``r``'s text so far; with a stream, without a trailing incomplete character."""
        backend = self.stream_backend
        if backend is None or any("\ufffd" in s for s in r.params.stop):  # a stop string may match U+FFFD
            return str(self.tokenizer.decode(r.out_ids, skip_special_tokens=True))
        if r.stream is None:
            from tokenizers.decoders import DecodeStream

            r.stream = DecodeStream(skip_special_tokens=True)
            r.text = ""
            for earlier in r.out_ids[:-1]:  # none in the engine: a row's stream starts with its first token
                r.text += r.stream.step(backend, earlier) or ""
        r.text += r.stream.step(backend, token) or ""
        return r.text

    def advance(
        self, r: Request, token: int, outbox: list[tuple[Request, Chunk]], report: TokenLogprobs | None = None
    ) -> bool:
        """Record ``token`` for ``r``, queue any safe new text in ``outbox``; True when ``r`` finished."""
        r.out_ids.append(token)
        r.pending_ids.append(token)
        if report is not None:
            r.pending_logprobs.append(report)
        logprobs = r.pending_logprobs if r.params.logprobs is not None else None
        text = self._text(r, token)
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
            if r.stream is not None and end == len(text):
                # The full text: an incomplete last character ends it as U+FFFD, as before. (A stop
                # string's ``end`` stays right: the stream's text is a prefix of the full one.)
                text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
                end = len(text)
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


def _stream_backend(tokenizer: Any) -> Any:
    """The tokenizer's `tokenizers.Tokenizer` when incremental decoding gives the full decode's text, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None  # a cleanup over the whole text (" ." -> ".") is not the sum of its pieces'
    try:
        from tokenizers.decoders import DecodeStream  # noqa: F401 - tokenizers >= 0.21
    except ImportError:
        return None
    return backend
