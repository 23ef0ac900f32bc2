"""Waiting in tests for what a server or job does on its own time (not a test module).

A fixed sleep is a guess that a loaded machine can lose: poll for the thing itself, with a
bound that only a real failure reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 600, every_s: float = 0.5) -> object:
    """``check()``'s first truthy result; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
