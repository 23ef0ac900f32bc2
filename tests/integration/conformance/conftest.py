"""The bigger conformance cell set runs only when asked for: ``pytest -m conformance_full``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "conformance_full" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="bigger conformance set: run with `-m conformance_full` (make test-conformance)")
    for item in items:
        if item.get_closest_marker("conformance_full"):
            item.add_marker(skip)
