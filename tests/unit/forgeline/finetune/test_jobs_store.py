"""FineTuningStore on SQLite: jobs scoped per organisation, cursor pages, compare-and-set
status changes, idempotent events. tests/integration/control/test_fine_tuning_store_pg.py
runs these same tests on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.finetune.jobs import (
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    FineTuningStore,
    NewJob,
    new_id,
)
from registry.errors import NotFoundError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FineTuningStore]:
    jobs = FineTuningStore(f"sqlite:///{tmp_path / 'control.db'}")
    yield jobs
    jobs.dispose()


def new_job(org: str = "acme", metadata: dict[str, str] | None = None) -> NewJob:
    job_id = new_id("ftjob")
    return NewJob(
        id=job_id,
        org=org,
        created_by="tess",
        model="tiny",
        training_file="file-train",
        validation_file=None,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0},
        suffix=None,
        seed=7,
        registered_name=f"ft-{org}-tiny-{job_id[6:14]}",
        train_job={"name": "x", "output_dir": "/tmp/x"},
        cluster={"kind": "local"},
        integrations=[],
        metadata=metadata,
    )


def create_many(store: FineTuningStore, n: int, org: str = "acme") -> list[str]:
    ids = []
    for i in range(n):
        ids.append(store.create(new_job(org, metadata={"i": str(i), "parity": "even" if i % 2 == 0 else "odd"})).id)
        time.sleep(0.002)  # distinct creation times, so "newest first" has one answer
    return ids


def test_new_ids() -> None:
    job_id = new_id("ftjob")
    assert job_id.startswith("ftjob-") and len(job_id) == 30 and job_id == job_id.lower()
    assert new_id("ftjob") != job_id


def test_create_stores_a_queued_job_and_its_first_events(store: FineTuningStore) -> None:
    asked = new_job(metadata={"team": "legal"})
    job = store.create(asked, first_events=[("created", "Created"), ("queued", "Queued")])
    assert (job.id, job.org, job.status, job.attempt) == (asked.id, "acme", QUEUED, 1)
    assert job.method == asked.method and job.hyperparameters == asked.hyperparameters
    assert job.metadata == {"team": "legal"} and job.integrations == [] and job.train_job == asked.train_job
    assert job.created_at.tzinfo is not None and job.finished_at is None and not job.finished
    assert store.get(job.id) == job
    events, more = store.events(job.id)
    assert [(e.key, e.message, e.level, e.type) for e in events] == [
        ("queued", "Queued", "info", "message"),
        ("created", "Created", "info", "message"),
    ]
    assert not more
    assert store.event_keys(job.id) == {"created", "queued"}


def test_another_organisation_sees_no_job(store: FineTuningStore) -> None:
    job = store.create(new_job("acme"))
    assert store.get(job.id, org="acme").id == job.id
    with pytest.raises(NotFoundError) as info:
        store.get(job.id, org="globex")
    assert info.value.param == "fine_tuning_job_id" and job.id in str(info.value)
    with pytest.raises(NotFoundError):
        store.get("ftjob-missing")
    assert store.list_jobs("globex") == ([], False)
    with pytest.raises(NotFoundError):
        store.list_jobs("globex", after=job.id)  # another organisation's job is no cursor either


def test_list_pages_newest_first(store: FineTuningStore) -> None:
    ids = create_many(store, 5)
    create_many(store, 2, org="globex")
    newest_first = list(reversed(ids))

    first, more = store.list_jobs("acme", limit=2)
    assert [j.id for j in first] == newest_first[:2] and more
    second, more = store.list_jobs("acme", after=first[-1].id, limit=2)
    assert [j.id for j in second] == newest_first[2:4] and more
    last, more = store.list_jobs("acme", after=second[-1].id, limit=2)
    assert [j.id for j in last] == newest_first[4:] and not more
    everything, more = store.list_jobs("acme", limit=5)
    assert [j.id for j in everything] == newest_first and not more
    assert store.list_jobs("acme", after=ids[0]) == ([], False)


def test_list_filters_on_metadata(store: FineTuningStore) -> None:
    ids = create_many(store, 5)
    even, more = store.list_jobs("acme", metadata_filter={"parity": "even"})
    assert [j.id for j in even] == [ids[4], ids[2], ids[0]] and not more
    page, more = store.list_jobs("acme", metadata_filter={"parity": "even"}, limit=2)
    assert [j.id for j in page] == [ids[4], ids[2]] and more
    assert [j.id for j in store.list_jobs("acme", metadata_filter={"parity": "odd", "i": "3"})[0]] == [ids[3]]
    assert store.list_jobs("acme", metadata_filter={"parity": "prime"}) == ([], False)


def test_transition_is_compare_and_set(store: FineTuningStore) -> None:
    job = store.create(new_job())
    assert store.transition(job.id, from_status=(QUEUED,), status=RUNNING, launcher_job_id=f"{job.id}-1")
    assert not store.transition(job.id, from_status=(QUEUED,), status=CANCELLED)  # someone moved it first
    moved = store.get(job.id)
    assert (moved.status, moved.launcher_job_id) == (RUNNING, f"{job.id}-1")
    assert moved.updated_at >= job.updated_at and moved.finished_at is None
    assert store.transition(job.id, from_status=(QUEUED, RUNNING), status=PAUSED)
    assert store.get(job.id).finished_at is None  # paused is not finished
    assert not store.transition("ftjob-missing", from_status=(QUEUED,), status=RUNNING)


def test_values_change_without_a_status_change(store: FineTuningStore) -> None:
    job = store.create(new_job())
    assert store.transition(job.id, from_status=(QUEUED, RUNNING), run_id="run-1")
    assert (store.get(job.id).status, store.get(job.id).run_id) == (QUEUED, "run-1")


@pytest.mark.parametrize("final", [SUCCEEDED, FAILED, CANCELLED])
def test_finished_at_is_set_on_finishing(store: FineTuningStore, final: str) -> None:
    job = store.create(new_job())
    error = {"code": "training_failed", "message": "boom", "param": None} if final == FAILED else None
    assert store.transition(job.id, from_status=(QUEUED,), status=final, error=error)
    done = store.get(job.id)
    assert done.status == final and done.finished and done.error == error
    assert done.finished_at is not None and done.finished_at >= done.created_at
    assert store.active() == []


def test_active_lists_queued_and_running_oldest_first(store: FineTuningStore) -> None:
    ids = create_many(store, 4)
    store.transition(ids[1], from_status=(QUEUED,), status=RUNNING)
    store.transition(ids[2], from_status=(QUEUED,), status=SUCCEEDED)
    store.transition(ids[3], from_status=(QUEUED,), status=PAUSED)
    assert [j.id for j in store.active()] == [ids[0], ids[1]]


def test_add_event_is_idempotent_by_key(store: FineTuningStore) -> None:
    job = store.create(new_job())
    other = store.create(new_job())
    assert store.add_event(
        job.id, "train_loss-10", "Step 10: loss=1.2", type="metrics", data={"step": 10, "train_loss": 1.2}
    )
    assert not store.add_event(job.id, "train_loss-10", "Step 10: loss=9.9 (again)")
    assert store.add_event(other.id, "train_loss-10", "Step 10 of the other job")  # keys are per job
    events, _ = store.events(job.id)
    assert len(events) == 1
    assert (events[0].message, events[0].type, events[0].data) == (
        "Step 10: loss=1.2",
        "metrics",
        {"step": 10, "train_loss": 1.2},
    )
    assert store.event_keys(job.id) == {"train_loss-10"} and store.event_keys("ftjob-none") == set()


def test_events_page_newest_first(store: FineTuningStore) -> None:
    job = store.create(new_job())
    for i in range(7):
        store.add_event(job.id, f"e{i}", f"event {i}", level="warn" if i == 3 else "info")
    first, more = store.events(job.id, limit=3)
    assert [e.message for e in first] == ["event 6", "event 5", "event 4"] and more
    second, more = store.events(job.id, after=first[-1].id, limit=3)
    assert [e.message for e in second] == ["event 3", "event 2", "event 1"] and more
    assert second[0].level == "warn"
    last, more = store.events(job.id, after=second[-1].id, limit=3)
    assert [e.message for e in last] == ["event 0"] and not more
    assert store.events(job.id, limit=7)[1] is False


def test_events_after_an_unknown_event(store: FineTuningStore) -> None:
    job = store.create(new_job())
    other = store.create(new_job())
    store.add_event(other.id, "x", "other job's event")
    other_event = store.events(other.id)[0][0].id
    with pytest.raises(NotFoundError) as info:
        store.events(job.id, after="ftevent-missing")
    assert info.value.param == "after"
    with pytest.raises(NotFoundError):
        store.events(job.id, after=other_event)  # an event of another job is no cursor here
