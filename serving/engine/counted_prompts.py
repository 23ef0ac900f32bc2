"""Token ids of prompts the gateway has counted and not yet generated, so each is tokenized once.

The gateway counts a prompt's tokens before it generates it (quota admission and usage need
the number first), then hands the same text to `TorchEngine.generate`, which needs the same
ids. Counting keeps them here and generating takes them, so a prompt goes through the
tokenizer once per request instead of twice. Prompts counted and never generated (a request
refused by its quota, a client gone) fall out oldest first, within a bound on entries and on
characters held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class CountedPrompts:
    """A bounded map from prompt text to its token ids, each entry taken once."""

    def __init__(self, *, max_entries: int = 64, max_chars: int = 4 * 1024 * 1024) -> None:
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self._max_entries = max_entries
        self._max_chars = max_chars
        # Counting runs on the event loop or the CPU pool's threads, generating on the loop.
        self._lock = threading.Lock()

    def keep(self, text: str, ids: list[int]) -> None:
        """Remember ``ids`` as the encoding of ``text`` until it is taken or pushed out."""
        if len(text) > self._max_chars:
            return
        with self._lock:
            old = self._ids.pop(text, None)
            if old is not None:
                self._chars -= len(text)
            self._ids[text] = ids
            self._chars += len(text)
            while len(self._ids) > self._max_entries or self._chars > self._max_chars:
                dropped, _ = self._ids.popitem(last=False)
                self._chars -= len(dropped)

    def take(self, text: str) -> list[int] | None:
        """The ids kept for ``text`` (and forget them), or None when it was not counted or fell out."""
        with self._lock:
            ids = self._ids.pop(text, None)
            if ids is not None:
                self._chars -= len(text)
            return ids

    def __len__(self) -> int:
        return len(self._ids)
