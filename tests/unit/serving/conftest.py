"""Fixtures for the serving unit tests: a started engine on the tiny artifact (tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.engine.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def engine(tiny_artifact: Path) -> Iterator[TorchEngine]:
    """A started engine on CPU; each test drives it with its own ``asyncio.run``.

    Works across event loops because every request carries its own loop and queue.
    """
    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=50.0, model_id="tiny")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())
