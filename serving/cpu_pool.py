"""A bounded thread pool for CPU-heavy request work (chat templates, tokenizing, JSON).

One 4 MB prompt takes the tokenizer and the Jinja chat template hundreds of milliseconds;
on the event loop that freezes every other request, ``/health`` included. `run_cpu` moves
such work to a few worker threads (tokenizers release the GIL; Python work yields it every
switch interval), so the loop keeps answering. Small inputs stay inline: the thread hop
would cost more than the work.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

INLINE_CHARS = 16 * 1024
"""Inputs up to this many characters (or bytes) are processed inline on the event loop."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cpu_workers() -> int:
    """Size of the pool: ``$FORGELINE_CPU_WORKERS``, default min(4, CPU count)."""
    configured = os.environ.get("FORGELINE_CPU_WORKERS", "").strip()
    if configured.isascii() and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, min(4, os.cpu_count() or 1))


def cpu_pool() -> ThreadPoolExecutor:
    """The process-wide pool (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_workers(), thread_name_prefix="forgeline-cpu")
        return _pool


async def run_cpu(size: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)``: inline when ``size`` (chars or bytes of input) is small, else on the pool."""
    if size <= INLINE_CHARS:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(cpu_pool(), functools.partial(fn, *args, **kwargs))
