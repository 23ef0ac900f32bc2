"""Alembic environment: migrations run on the connection :func:`registry.migrations.upgrade`
hands over, inside its transaction (no engine of its own, no ``alembic.ini``)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run control-database migrations through registry.migrations.upgrade(engine)")
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
