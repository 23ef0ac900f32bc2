"""An app that tells how many objects its process has frozen out of garbage collection.

    python -m tests.support.freeze_probe PORT [WORKERS]    # served by `run_server`, as `forgeline serve` is
"""

from __future__ import annotations

import gc
import sys

from fastapi import FastAPI


def app() -> FastAPI:
    """The probe app (a factory: `run_server` with several workers builds one per process)."""
    probe = FastAPI()

    @probe.get("/frozen")
    def frozen() -> dict[str, int]:
        return {"frozen": gc.get_freeze_count()}

    return probe


if __name__ == "__main__":
    from serving.gateway.server import run_server

    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    run_server("tests.support.freeze_probe:app" if workers > 1 else app(), port=port, log_level="warning", workers=workers)
