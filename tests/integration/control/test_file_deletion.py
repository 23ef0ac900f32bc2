"""Deleting a fine-tuning file removes its copies in job folders: at once for finished
jobs, when they finish for jobs that still need it (the API names those)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.control import create_control_app
from forgeline.finetune.service import FineTuning, FineTuningSettings
from forgeline.finetune.supervisor import Supervisor
from serving.gateway.server import serve_in_background
from tests.conftest import SUPPORT_DATA
from tests.support.finetune_client import Org, chat_file

pytestmark = pytest.mark.integration


@pytest.fixture
def plane() -> Iterator[tuple[str, FineTuning]]:
    app = create_control_app(supervise=False, fine_tuning=FineTuningSettings())  # nothing trains here
    url, stop = serve_in_background(app)
    try:
        yield url, app.state.fine_tuning
    finally:
        stop()


def copies(ft: FineTuning, job_id: str) -> dict[str, Path]:
    data = ft.store.get(job_id).train_job["data"]
    return {kind: Path(data[kind]) for kind in ("train", "eval") if data.get(kind)}


def test_deleting_a_file_removes_its_copies_once_no_job_needs_them(
    plane: tuple[str, FineTuning], org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ft = plane
    tess = org.client(url, "tess")
    train = tess.files.create(file=chat_file(tmp_path / "t.jsonl", SUPPORT_DATA / "train.jsonl", 40).open("rb"),
                              purpose="fine-tune")
    valid = tess.files.create(file=chat_file(tmp_path / "v.jsonl", SUPPORT_DATA / "eval.jsonl", 12).open("rb"),
                              purpose="fine-tune")
    running = tess.fine_tuning.jobs.create(model="tiny", training_file=train.id, validation_file=valid.id)
    done = tess.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    tess.fine_tuning.jobs.cancel(done.id)
    assert all(p.is_file() for p in [*copies(ft, running.id).values(), *copies(ft, done.id).values()])

    deleted = tess.files.delete(train.id)
    assert deleted.deleted and deleted.retained_by == [running.id]  # type: ignore[attr-defined]
    assert not copies(ft, done.id)["train"].exists()  # finished: its copy went at once
    assert copies(ft, running.id)["train"].is_file()  # still needed
    assert copies(ft, running.id)["eval"].is_file()  # another file, not deleted

    # The job ends (here: fails); the supervisor's next pass removes the copy it kept.
    supervisor = Supervisor(ft)
    monkeypatch.setattr(supervisor, "_advance", lambda job: None)  # follow jobs without launching training
    supervisor.tick()
    assert ft.store.transition(running.id, from_status=("queued", "running"), status="failed")
    supervisor.tick()
    assert not copies(ft, running.id)["train"].exists()
    assert copies(ft, running.id)["eval"].is_file()
    events = [e.message for e in tess.fine_tuning.jobs.list_events(running.id)]
    assert any("keeps its copy" in m for m in events) and any("Removed train.jsonl" in m for m in events)

    # Deleting the validation file now leaves nothing behind and nothing retained.
    assert tess.files.delete(valid.id).retained_by == []  # type: ignore[attr-defined]
    assert not copies(ft, running.id)["eval"].exists()
