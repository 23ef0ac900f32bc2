"""Lineage helpers: tag keys and the git commit lookup."""

from __future__ import annotations

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
