"""Shared fixtures: every test gets its own $FORGELINE_HOME so nothing touches ~/.forgeline."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.families import build_family

REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "assets" / "tiny-base"
SUPPORT_DATA = REPO / "recipes" / "data" / "support-tickets"


STATE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")
"""Variables that point forgeline or MLflow at a state other than ``$FORGELINE_HOME``."""


def point_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Make ``home`` the only state this process sees (in-process training sets
    ``MLFLOW_TRACKING_URI`` for MLflow's callback; module fixtures run before the autouse one)."""
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    for var in STATE_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


def pytest_configure(config: pytest.Config) -> None:
    """A throwaway home for the whole session, under the per-test one: module- and
    session-scoped fixtures run before `isolated_home` and must not reach ~/.forgeline either."""
    home = tempfile.mkdtemp(prefix="forgeline-test-home-")
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["FORGELINE_HOME"] = home
    for var in STATE_VARS:
        os.environ.pop(var, None)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return point_home(monkeypatch, tmp_path / "forgeline-home")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``family_checkpoint("gemma2")``: the folder of that family's tiny checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 2-layer random Llama with a tokenizer that has a chat template (the one tiny base)."""
    from tests.support.tiny_model import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_base: Path) -> Path:
    """A torch engine artifact built from `tiny_base` (no adapter)."""
    from serving.artifacts.torch_build import build_torch_artifact

    out = tiny_base.parent / "artifact"
    build_torch_artifact(str(tiny_base), None, out)
    return out
