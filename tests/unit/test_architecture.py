"""The dependency rules of docs/ARCHITECTURE.md, checked on the source so a stray import fails CI.

The rules themselves are import contracts in ``pyproject.toml`` (``[tool.importlinter]``):
layers (forgeline above training | serving above registry, the middle two independent),
registry importing none of ours, serving and forgeline importing no mlflow (the registry
facade does), and no import cycles between sibling modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_platform_holds_no_python() -> None:
    # A `platform` package would shadow the standard library's `platform` module.
    assert not list((REPO / "platform").rglob("*.py"))
    assert not (REPO / "platform" / "__init__.py").exists()
