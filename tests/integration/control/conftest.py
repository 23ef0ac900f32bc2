"""The control plane runs on the same backends as the registry tests."""

from tests.integration.registry.backends import (  # noqa: F401
    backend,
    migrated_mlflow_db,
    mlflow_server,
    postgres_server,
)
