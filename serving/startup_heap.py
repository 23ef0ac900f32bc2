"""Keep the garbage collector off the objects a server process made while starting.

A started worker holds over half a million objects the collector tracks (torch, transformers,
the model's modules, FastAPI's routes and models), and nearly all of them live as long as the
process. A full collection walks every one of them while holding the GIL: ~230 ms on two
cores, during which no request of any client moves (`python -m bench.gc_pause`). `gc.freeze`
moves them to a generation the collector never walks, so later collections walk only what
requests allocate. A frozen object that dies is still freed by reference counting; only a
reference cycle among frozen objects would stay until exit, which for start-up state is
where it would have stayed anyway.

Only a process that owns its server freezes (`run_server`): a server on a background thread
of someone else's process (`serve_in_background`, tests) leaves that process's heap alone.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then freeze everything alive; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d start-up objects out of garbage collection", frozen)
    return frozen
