"""The exact bytes and text of single tokens, for log-probability reports.

Decoding one byte-level BPE token on its own garbles characters split across tokens, so
the bytes come from the vocabulary string instead: byte-level tokenizers (GPT-2 style)
spell each byte as one printable character, SentencePiece-style ones spell unknown bytes
as ``<0xNN>`` and spaces as ``▁``. Other tokenizers fall back to decoding the token.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of each byte, reversed (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """Maps token ids of one tokenizer to their bytes and text (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder is not None else ""
        self._byte_level = _byte_level_decoder() if decoder == "ByteLevel" else None
        self._special = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, bytes)`` of ``token_id``; text has U+FFFD where the bytes end mid-character."""
        known = self._cache.get(token_id)
        if known is None:
            raw = self._bytes(token_id)
            known = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return known

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return str(piece).encode("utf-8")
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        match = _BYTE_FALLBACK.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if "▁" in piece:  # SentencePiece's visible space
            return piece.replace("▁", " ").encode("utf-8")
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False)).encode("utf-8")
