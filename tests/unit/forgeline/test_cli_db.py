"""``forgeline db status`` / ``upgrade`` on a database made before migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine
from typer.testing import CliRunner

import registry.audit  # noqa: F401  (declares alias_events)
from forgeline.cli import app
from registry import migrations
from registry.db import metadata


def test_status_and_upgrade_of_a_create_all_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    runner = CliRunner()
    assert "no database yet" in runner.invoke(app, ["db", "status", "--db-url", url]).output

    engine = create_engine(url)
    metadata.create_all(engine, tables=[metadata.tables["alias_events"]])  # what forgeline did before migrations
    engine.dispose()
    result = runner.invoke(app, ["db", "status", "--db-url", url])
    assert result.exit_code == 0 and "made before migrations" in result.output

    result = runner.invoke(app, ["db", "upgrade", "--db-url", url])
    assert result.exit_code == 0 and f"at revision {migrations.head()}" in result.output
    assert "up to date" in runner.invoke(app, ["db", "status", "--db-url", url]).output
