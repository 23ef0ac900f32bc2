"""Backends (SQLite; PostgreSQL + a real ``mlflow server``) for the registry tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import (  # noqa: F401
    backend,
    fresh_database,
    migrated_mlflow_db,
    mlflow_server,
    postgres_server,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty control database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        yield fresh_database(request.getfixturevalue("postgres_server"), prefix="control")
