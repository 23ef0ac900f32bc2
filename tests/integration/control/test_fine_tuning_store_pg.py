"""FineTuningStore on PostgreSQL: the SQLite tests of tests/unit/forgeline/finetune/test_jobs_store.py,
run against a fresh database (skipped when PostgreSQL is not installed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from forgeline.finetune.jobs import FineTuningStore
from tests.support.backends import fresh_database
from tests.unit.forgeline.finetune.test_jobs_store import (  # noqa: F401  (collected here, with the PostgreSQL store below)
    test_active_lists_queued_and_running_oldest_first,
    test_add_event_is_idempotent_by_key,
    test_another_organisation_sees_no_job,
    test_create_stores_a_queued_job_and_its_first_events,
    test_events_after_an_unknown_event,
    test_events_page_newest_first,
    test_finished_at_is_set_on_finishing,
    test_list_filters_on_metadata,
    test_list_pages_newest_first,
    test_transition_is_compare_and_set,
    test_values_change_without_a_status_change,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(postgres_server: str) -> Iterator[FineTuningStore]:
    jobs = FineTuningStore(fresh_database(postgres_server, prefix="ftjobs"))
    assert jobs.engine.dialect.name == "postgresql"
    yield jobs
    jobs.dispose()
