"""Fixtures for the serving unit tests: a tiny base model and its torch engine artifact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.artifacts.torch_build import build_torch_artifact
from serving.engine.torch_engine import TorchEngine
from tests.unit.serving.tiny_model import build_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer random Llama with a tokenizer that has a chat template."""
    return build_tiny_base(tmp_path_factory.mktemp("serving-unit") / "base")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_base: Path) -> Path:
    """A torch engine artifact built from `tiny_base` (no adapter)."""
    out = tiny_base.parent / "artifact"
    build_torch_artifact(str(tiny_base), None, out)
    return out


@pytest.fixture(scope="module")
def engine(tiny_artifact: Path) -> Iterator[TorchEngine]:
    """A started engine on CPU; each test drives it with its own ``asyncio.run``.

    Works across event loops because every request carries its own loop and queue.
    """
    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=50.0, model_id="tiny")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())
