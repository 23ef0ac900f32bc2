"""The migration tree describes exactly the tables the code declares (so a new column
without a revision fails here, naming it)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import forgeline.finetune.base_models  # noqa: F401  (declare their tables on registry.db.metadata)
import forgeline.finetune.files  # noqa: F401
import forgeline.finetune.jobs  # noqa: F401
import jobs.store  # noqa: F401
import registry.approvals  # noqa: F401
import registry.audit  # noqa: F401
import registry.events  # noqa: F401
import registry.keys  # noqa: F401
from registry import migrations
from registry.db import create_control_engine, metadata

REPO = Path(__file__).resolve().parents[3]


def test_every_module_that_declares_a_control_table_is_imported_here() -> None:
    declaring = sorted(
        str(path.relative_to(REPO))
        for package in ("registry", "forgeline", "training", "serving", "jobs")
        for path in (REPO / package).rglob("*.py")
        if "migrations" not in path.parts and "\n    metadata,\n" in path.read_text()
    )
    assert declaring == [
        "forgeline/finetune/base_models.py",
        "forgeline/finetune/files.py",
        "forgeline/finetune/jobs.py",
        "jobs/store.py",
        "registry/approvals.py",
        "registry/audit.py",
        "registry/events.py",
        "registry/keys.py",
    ], "a module declares a control table: import it above so the schema check covers it"


def test_head_schema_equals_the_declared_tables(tmp_path: Path) -> None:
    engine = create_control_engine(f"sqlite:///{tmp_path / 'control.db'}")
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == [], f"the declared tables differ from the newest migration; add a revision: {diff}"
