"""The control plane runs on the same backends as the registry tests."""

import pytest

from tests.support.backends import (  # noqa: F401
    backend,
    migrated_mlflow_db,
    mlflow_server,
    postgres_server,
)
from tests.support.finetune_client import Org, add_tiny_base, make_org


@pytest.fixture
def org() -> Org:
    """The tiny base added by the operator, and the keys of one test's people (see `make_org`)."""
    add_tiny_base()
    return make_org()
