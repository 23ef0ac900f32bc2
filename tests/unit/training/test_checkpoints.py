"""Resume decisions: only complete checkpoints count; a finished or changed job starts over."""

from __future__ import annotations

from pathlib import Path

from training.checkpoints import MARKER, JobState, discard_incomplete, newest_complete, plan_resume, write_state


def checkpoint(root: Path, step: int, *, complete: bool) -> Path:
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text("{}")
        (folder / MARKER).write_text(f"{step}\n")
    return folder


def test_a_half_written_checkpoint_is_never_picked(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10, complete=True)
    checkpoint(tmp_path, 20, complete=True)
    half = checkpoint(tmp_path, 30, complete=False)
    (half / "trainer_state.json").write_text("{}")  # trainer state written, but not every rank finished
    assert newest_complete(tmp_path / "checkpoints").name == "checkpoint-20"
    write_state(tmp_path, JobState(run_id="r1", recipe_hash="h", data_digest="d"))
    plan = plan_resume(tmp_path, mode="auto", recipe_hash="h", data_digest="d")
    assert (plan.run_id, plan.step) == ("r1", 20)
    assert discard_incomplete(tmp_path / "checkpoints") == [half]
    assert not half.exists()


def test_fresh_start_when_finished_changed_never_or_nothing_saved(tmp_path: Path) -> None:
    assert plan_resume(tmp_path, mode="auto", recipe_hash="h", data_digest="d").checkpoint is None
    checkpoint(tmp_path, 10, complete=True)
    write_state(tmp_path, JobState(run_id="r1", recipe_hash="h", data_digest="d"))
    for mode, recipe_hash, digest in (("never", "h", "d"), ("auto", "other", "d"), ("auto", "h", "other")):
        plan = plan_resume(tmp_path, mode=mode, recipe_hash=recipe_hash, data_digest=digest)
        assert plan.checkpoint is None and plan.run_id is None and plan.stale_run_id == "r1"
    write_state(tmp_path, JobState(run_id="r1", recipe_hash="h", data_digest="d", status="finished", version=3))
    plan = plan_resume(tmp_path, mode="auto", recipe_hash="h", data_digest="d")
    assert plan.checkpoint is None and plan.stale_run_id is None and "version 3" in plan.reason
