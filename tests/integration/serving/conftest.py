"""Fixtures for the gateway integration tests: the real app on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.build.torch_build import build_torch_artifact
from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background
from tests.unit.serving.tiny_model import build_tiny_base


@dataclass
class Gateway:
    base_url: str
    artifact: Path
    engine: TorchEngine


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch engine artifact built from a tiny random Llama."""
    root = tmp_path_factory.mktemp("serving-integration")
    base = build_tiny_base(root / "base")
    out = root / "artifact"
    build_torch_artifact(str(base), None, out)
    return out


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
