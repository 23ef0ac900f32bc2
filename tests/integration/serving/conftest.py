"""Fixtures for the gateway integration tests: the real app on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.artifacts.torch_build import build_torch_artifact
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
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a tokenizer (the base the adapters are trained on)."""
    return build_tiny_base(tmp_path_factory.mktemp("serving-integration") / "base")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_base_dir: Path) -> Path:
    """A torch engine artifact built from a tiny random Llama."""
    out = tiny_base_dir.parent / "artifact"
    build_torch_artifact(str(tiny_base_dir), None, out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base_dir: Path) -> dict[str, Path]:
    """Two LoRA adapters on the tiny base that steer it differently."""
    from tests.unit.serving.tiny_model import build_tiny_adapter

    root = tiny_base_dir.parent
    return {name: build_tiny_adapter(tiny_base_dir, root / f"adapter-{name}", seed=seed) for name, seed in (("a", 1), ("b", 2))}


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
