"""forgeline's state is its owner's only, whatever the umask: folders 0700, databases 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import settings
from registry.audit import AuditLog
from registry.owner import Owner

DEFAULT = Owner("default", 1)  # the owning org and registration rows are written for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # what most users have: files 0644, folders 0755
    try:
        yield
    finally:
        os.umask(previous)


def test_home_databases_and_artifacts_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose_umask: None) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FORGELINE_DB_URL", raising=False)

    audit = AuditLog()
    audit.append(model="m", alias="production", from_version=None, to_version=1, actor="a", reason="r", action="promote", owner=DEFAULT)
    audit.dispose()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri())
    client.create_experiment("e", artifact_location=settings.artifact_root())

    assert mode(home) == 0o700
    assert mode(home / "control.db") == 0o600
    assert mode(home / "mlflow.db") == 0o600 and (home / "mlflow.db").stat().st_size > 0  # MLflow used our file
    assert mode(home / "artifacts") == 0o700
    # Nothing under the home is open to others except behind a 0700 folder.
    for path in home.rglob("*"):
        guarded = any(mode(parent) & 0o077 == 0 for parent in path.parents if parent == home or home in parent.parents)
        assert guarded or mode(path) & 0o077 == 0, path


def test_an_existing_loose_home_and_database_are_tightened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose_umask: None) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "control.db").touch(mode=0o644)
    os.chmod(home / "control.db", 0o644)
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    monkeypatch.delenv("FORGELINE_DB_URL", raising=False)
    audit = AuditLog()
    assert audit.history("m", owner=DEFAULT) == []
    audit.dispose()
    assert (mode(home), mode(home / "control.db")) == (0o700, 0o600)


def test_private_dir_and_file_only_remove_bits(tmp_path: Path, loose_umask: None) -> None:
    job = settings.private_dir(tmp_path / "jobs" / "m" / "abc")
    assert mode(job) == 0o700
    os.chmod(job, 0o500)  # the owner made it read-only: stays so
    settings.private_dir(job)
    assert mode(job) == 0o500
    assert mode(settings.private_file(tmp_path / "x.db")) == 0o600
