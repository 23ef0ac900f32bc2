"""Backends (SQLite; PostgreSQL + a real ``mlflow server``) for the registry tests."""

from tests.integration.registry.backends import (  # noqa: F401
    backend,
    migrated_mlflow_db,
    mlflow_server,
    postgres_server,
)
