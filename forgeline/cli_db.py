"""``forgeline db``: the control database's schema revision (status) and migration (upgrade).

Every forgeline process migrates the control database when it opens it
(:mod:`registry.migrations`), so ``upgrade`` is only needed to migrate ahead of a rollout
(e.g. once, before restarting many replicas on PostgreSQL). After Alembic, ``upgrade``
also gives approval and audit rows written before organisations were recorded to their
model's owner in MLflow (:mod:`registry.legacy_orgs`; the control plane does so when it
starts). Self-contained so ``cli`` registers it with one ``add_typer`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from forgeline.cli_shared import console, handles_errors
from registry import legacy_orgs, migrations, settings
from registry.audit import AuditLog
from registry.client import Registry
from registry.db import create_control_engine

db_app = typer.Typer(no_args_is_help=True, help="Control database: schema revision and migrations.")

DbUrl = Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL; default FORGELINE_DB_URL or "
                                           "$FORGELINE_HOME/control.db.", show_default=False)]


@db_app.command("status")
@handles_errors
def status(db_url: DbUrl = None) -> None:
    """Print the database's schema revision and the newest this forgeline knows (changes nothing)."""
    url = make_url(db_url or settings.control_db_url())
    where = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        if not Path(url.database).is_file():
            console.print(f"{where}: no database yet (made at revision {migrations.head()} on first use)")
            return
    engine = create_engine(url)
    head = migrations.head()
    try:
        with engine.connect() as conn:
            current = migrations.current(conn)
        left = legacy_orgs.unclaimed(engine) if current == head else 0
    finally:
        engine.dispose()
    if current == head:
        state = "up to date"
        if left:
            state += (f"; {left} approval and audit rows from before organisations were recorded count for nobody "
                      "(`forgeline db upgrade` gives those newer than their model to its owner)")
    elif current is None:
        state = "made before migrations; the next forgeline command upgrades it in place"
    else:
        state = f"at {current}; the next forgeline command upgrades it (or run `forgeline db upgrade`)"
    console.print(f"{where}: revision {current or '-'} (newest {head}): {state}")


@db_app.command("upgrade")
@handles_errors
def upgrade(db_url: DbUrl = None) -> None:
    """Migrate the database to the newest revision now (what any forgeline command does on open)."""
    url = db_url or settings.control_db_url()
    engine = create_control_engine(url)
    try:
        with engine.connect() as conn:
            current = migrations.current(conn)
    finally:
        engine.dispose()
    where = make_url(url).render_as_string(hide_password=True)
    console.print(f"{where}: at revision {current}")
    registry = Registry(audit=AuditLog(url))
    try:
        claimed = legacy_orgs.claim(registry)
    finally:
        registry.close()
    if claimed.total or claimed.left:
        console.print(
            f"{where}: gave {claimed.total} approval and audit rows from before organisations were recorded to "
            f"their model's owner; {claimed.left} stay with nobody (their model was deleted or registered again)"
        )
