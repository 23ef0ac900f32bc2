"""One generation request as the engine's worker thread sees it, and how its chunks reach the caller."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.engine.base import Chunk, SamplingParams, TokenGuide, TokenLogprobs


@dataclass(eq=False)
class Request:
    """One request's state; decode fields are touched only by the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | BaseException]
    adapter: str | None = None  # public adapter name, None for the base weights
    adapter_path: Path | None = None
    stop_ids: frozenset[int] = frozenset()  # the adapter's end-of-turn tokens, besides the base's
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: Any = None  # torch.Generator, created on the worker's device
    guide: TokenGuide | None = None  # this sequence's own constraint, from params.guide
    out_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # generated since the last chunk
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per pending id, when asked
    emitted: int = 0  # characters of text already delivered
    stream: Any = None  # the row's `tokenizers.decoders.DecodeStream`, when its detokenizer decodes incrementally
    text: str = ""  # the stream's text so far (complete characters only)
    done: bool = False
    solo: bool = False  # retried alone after its batch failed: a failure now is its own
    arrived: float = 0.0  # time.monotonic() when queued

    def deliver(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody will read this row any more.
            self.cancelled.set()

    def fail(self, exc: BaseException) -> None:
        """End the request with ``exc`` unless it already ended."""
        if not self.done:
            self.done = True
            self.deliver(exc)


def take_queued(first: Chunk, queue: asyncio.Queue[Chunk | BaseException]) -> tuple[Chunk, BaseException | None]:
    """``first`` merged with the chunks already waiting behind it, and an error that ended them.

    A reader that falls behind the decode loop (a busy event loop, a slow client) then sends
    one event for several tokens instead of one per token: the same text and tokens, fewer
    writes, and the writes are what the event loop spends its time on under load. A reader
    that keeps up finds nothing queued and sends every chunk as it comes.
    """
    if queue.empty() or first.finish_reason is not None:
        return first, None
    text, ids = [first.text], list(first.token_ids)
    logprobs = list(first.logprobs) if first.logprobs is not None else None
    finish = None
    error: BaseException | None = None
    while finish is None and not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            error = item
            break
        text.append(item.text)
        ids.extend(item.token_ids)
        if logprobs is not None and item.logprobs is not None:
            logprobs.extend(item.logprobs)
        finish = item.finish_reason
    return Chunk("".join(text), ids, finish, logprobs), error


def _put_all(items: list[tuple[asyncio.Queue[Chunk | BaseException], Chunk]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def flush(outbox: list[tuple[Request, Chunk]]) -> None:
    """Deliver one decode step's chunks with one wake-up per event loop, not one per row.

    Fewer cross-thread wake-ups mean less GIL contention with the decode thread.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Chunk]]] = {}
    for r, chunk in outbox:
        by_loop.setdefault(r.loop, []).append((r, chunk))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, [(r.queue, chunk) for r, chunk in items])
        except RuntimeError:
            for r, _ in items:
                r.cancelled.set()
    outbox.clear()
