"""Training integration fixtures: recipes built from the tiny ones, and CPU thread settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "recipes" / "tiny"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread: on a shared 2-core machine OpenMP's spinning threads
    otherwise burn several times the CPU of the tiny model's actual work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write recipes/tiny/<name>.yaml with section overrides into tmp (paths made absolute)."""

    def make(name: str, **overrides: dict[str, Any]) -> Path:
        raw = yaml.safe_load((TINY / f"{name}.yaml").read_text())
        raw["model"]["base"] = str((TINY / raw["model"]["base"]).resolve())
        if str(raw["model"].get("chat_template", "")).endswith(".jinja"):
            raw["model"]["chat_template"] = str((TINY / raw["model"]["chat_template"]).resolve())
        raw["data"] = {k: (str((TINY / v).resolve()) if isinstance(v, str) else v) for k, v in raw["data"].items()}
        for section, values in overrides.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.fixture
def extensions_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed compiles a small C++ op on first use (~45 s); share the build across runs (CI sets this too)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch-extensions"))
