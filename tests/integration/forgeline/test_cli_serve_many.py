"""``forgeline serve --base a --base b --model m`` starts every time (its engines used to race
at start-up: a failed import on the second loader thread, or weights left half-initialised)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.hardening import serve_starts, setup_registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STARTS = 3  # `python -m bench.hardening` does 10


def test_serve_with_two_bases_and_a_model_starts_every_time(tmp_path: Path) -> None:
    setup_registry(tmp_path)
    result = serve_starts(tmp_path, STARTS)
    assert result["ok"] == STARTS, "\n".join(result["failures"])
