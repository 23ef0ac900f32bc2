"""A server process freezes its start-up heap out of garbage collection; a server in someone else's process does not."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.gateway.server import serve_in_background
from tests.support.backends import free_port
from tests.support.freeze_probe import app as probe_app
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("workers", [1, 2])
def test_run_server_freezes_each_process_once_started(workers: int) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.freeze_probe", str(port), str(workers)], cwd=REPO, env=env,
        start_new_session=True,
    )
    try:
        def answers() -> list[int] | None:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}")
            try:  # a fresh connection each time: with two workers, the kernel spreads them
                return [httpx.get(f"http://127.0.0.1:{port}/frozen", timeout=2).json()["frozen"] for _ in range(6)]
            except httpx.TransportError:
                return None

        frozen = wait_for("the probe server to answer", answers, timeout_s=60)
        # The app, FastAPI, uvicorn and their modules: thousands of objects, in every process.
        assert min(frozen) > 10_000, frozen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_in_background_leaves_its_hosts_heap_alone() -> None:
    before = gc.get_freeze_count()
    url, stop = serve_in_background(probe_app())
    try:
        assert httpx.get(f"{url}/frozen").json()["frozen"] == before
    finally:
        stop()
    assert gc.get_freeze_count() == before
