"""The JSON access log follows stdout: a gateway outliving a swapped stdout keeps logging."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from serving.service import configure_access_log


def test_lines_go_to_the_stdout_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    access = logging.getLogger("forgeline.access")
    monkeypatch.setattr(access, "handlers", [])
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    configure_access_log()
    access.info('{"n": 1}')
    first.close()  # as pytest closes one test's captured stdout while a server thread lives on
    monkeypatch.setattr(sys, "stdout", second)
    access.info('{"n": 2}')
    assert second.getvalue() == '{"n": 2}\n'
