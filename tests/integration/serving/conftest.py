"""Fixtures for the gateway integration tests: the real app on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background


@dataclass
class Gateway:
    base_url: str
    artifact: Path
    engine: TorchEngine


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path) -> dict[str, Path]:
    """Two LoRA adapters on the tiny base that steer it differently."""
    from tests.support.tiny_model import build_tiny_adapter

    root = tiny_base.parent / "gateway-adapters"
    return {name: build_tiny_adapter(tiny_base, root / f"adapter-{name}", seed=seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def gateway(tiny_artifact: Path) -> Iterator[Gateway]:
    """The gateway serving ``tiny`` (aliases ``tiny@production``, ``tiny@1``) under uvicorn."""
    engine = TorchEngine(tiny_artifact, device="cpu", model_id="tiny")
    served = ServedModel(
        name="tiny", version="1", engine=engine, aliases=("tiny@production", "tiny@1"), artifact=str(tiny_artifact)
    )
    app = create_app(StaticCatalog([served]), max_new_tokens=64)
    base_url, stop = serve_in_background(app)
    try:
        yield Gateway(base_url=base_url, artifact=tiny_artifact, engine=engine)
    finally:
        stop()
