"""The dependency rules of ARCHITECTURE.md, checked on the source so a stray import fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BANNED = {
    "training": {"serving", "forgeline"},
    "serving": {"training", "forgeline"},
    "registry": {"training", "serving", "forgeline"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(BANNED))
def test_package_imports_only_what_it_may(package: str) -> None:
    offending = {
        str(path.relative_to(REPO)): sorted(imported_roots(path) & BANNED[package])
        for path in (REPO / package).rglob("*.py")
        if imported_roots(path) & BANNED[package]
    }
    assert not offending, f"{package} must not import {sorted(BANNED[package])}: {offending}"


def test_platform_holds_no_python() -> None:
    # A `platform` package would shadow the standard library's `platform` module.
    assert not list((REPO / "platform").rglob("*.py"))
    assert not (REPO / "platform" / "__init__.py").exists()
