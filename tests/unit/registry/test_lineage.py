"""Lineage helpers: tag keys and the git commit lookup."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from registry import lineage


def test_every_tag_key_is_namespaced() -> None:
    keys = [
        lineage.BASE_MODEL,
        lineage.METHOD,
        lineage.ADAPTER,
        lineage.RECIPE_HASH,
        lineage.DATASET_DIGEST,
        lineage.GIT_COMMIT,
        lineage.RUN_ID,
        lineage.TRAINED_BY,
        lineage.ENGINE_PREFIX,
        lineage.EVAL_PREFIX,
        lineage.BASE_EVAL_PREFIX,
    ]
    assert all(key.startswith("forgeline.") for key in keys)
    assert lineage.engine_tag("torch") == "forgeline.engine.torch"


def test_git_commit_outside_a_repository_is_none(tmp_path: Path) -> None:
    assert lineage.git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_of_a_repository(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    assert lineage.git_commit(tmp_path) is None  # no commit yet
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", "init")
    assert lineage.git_commit(tmp_path) == git("rev-parse", "HEAD").strip()


REPO = Path(__file__).resolve().parents[3]
# A tag key, or the start of one in an f-string: `forgeline.` then dotted lowercase words.
_TAG_LIKE = re.compile(r"^forgeline\.[a-z_]+(\.[a-z_]*)*$")


def _tag_literals(source: str) -> list[tuple[int, str]]:
    """String constants shaped like a ``forgeline.*`` tag key, except logger names."""
    tree = ast.parse(source)
    logger_names = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "getLogger"
        for arg in node.args
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in logger_names
        and _TAG_LIKE.match(node.value)
    ]


def test_tag_keys_are_spelled_only_in_lineage() -> None:
    # Every tag key is a constant (or a function) in registry/lineage.py, so a typo is an
    # AttributeError rather than a tag nobody reads.
    lineage_py = REPO / "registry" / "lineage.py"
    found = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for package in ("forgeline", "training", "serving", "jobs", "registry")
        for path in sorted((REPO / package).rglob("*.py"))
        if path != lineage_py
        for line, value in _tag_literals(path.read_text(encoding="utf-8"))
    ]
    assert not found, "use a constant from registry/lineage.py instead of:\n" + "\n".join(found)


def test_tag_scan_finds_literals_and_passes_logger_names() -> None:
    source = (
        'import logging\nlog = logging.getLogger("forgeline.access")\n'
        'tags = {"forgeline.total_steps": "3"}\nkey = f"forgeline.eval.{name}"\nlabel = "forgeline.dev/job-id"\n'
    )
    assert _tag_literals(source) == [(3, "forgeline.total_steps"), (4, "forgeline.eval.")]
