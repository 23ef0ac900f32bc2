"""Never lose work: complete checkpoints, and the job state that lets a rerun resume.

Hugging Face's Trainer writes ``checkpoint-N`` in place, file by file (and, under
DeepSpeed, each rank writes its own shards), so a kill can leave a half-written folder
that looks like any other. Once every rank has finished a save, rank 0 drops a marker in
the folder; only marked folders are ever resumed from. The job's output folder also holds
``job-state.json`` (the MLflow run id, what the run trained on, and whether it finished),
so a rerun continues the same run rather than opening a new one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .distributed import barrier

log = logging.getLogger(__name__)

MARKER = ".forgeline-complete"
"""File written into a checkpoint folder once all of it is on disk."""

STATE_FILE = "job-state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def checkpoint_step(path: Path) -> int:
    """The global step of a ``checkpoint-N`` folder."""
    match = _CHECKPOINT.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-N folder")
    return int(match.group(1))


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """A checkpoint every rank finished writing (marker present, trainer state readable)."""
    return (path / MARKER).is_file() and (path / "trainer_state.json").is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest step first."""
    return [p for p in _checkpoints(folder) if is_complete(p)]


def newest_complete(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder``, if any."""
    complete = complete_checkpoints(folder)
    return complete[-1] if complete else None


def discard_incomplete(folder: Path) -> list[Path]:
    """Delete half-written checkpoints (so the Trainer never rotates or reads them); returns them."""
    removed = [p for p in _checkpoints(folder) if not is_complete(p)]
    for path in removed:
        log.warning("discarding incomplete checkpoint %s (the job was interrupted while saving it)", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def mark_complete_callback() -> Any:
    """A ``TrainerCallback`` that marks each checkpoint complete once every rank has saved it."""
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            barrier()  # DeepSpeed ranks write their own shards; wait for the slowest
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if (folder / "trainer_state.json").is_file():
                    write_atomic(folder / MARKER, f"{state.global_step}\n")
            barrier()

    return MarkCompleteCheckpoints()


class JobState(BaseModel):
    """What a rerun of the same job needs to know; lives in the job's output folder."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    recipe_hash: str
    data_digest: str
    status: Literal["running", "finished"] = "running"
    version: int | None = None


def read_state(out: Path) -> JobState | None:
    """The job state in ``out``, or None when there is none (or it is unreadable)."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        return JobState.model_validate_json(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable %s", path)
        return None


def write_state(out: Path, state: JobState) -> None:
    write_atomic(out / STATE_FILE, state.model_dump_json(indent=2) + "\n")


class ResumePlan(BaseModel):
    """Where a job starts: a checkpoint and an MLflow run to continue, or a fresh start."""

    model_config = ConfigDict(frozen=True)

    checkpoint: str | None = None
    run_id: str | None = None
    stale_run_id: str | None = None  # an interrupted run we start over from (marked KILLED)
    reason: str

    @property
    def step(self) -> int:
        return checkpoint_step(Path(self.checkpoint)) if self.checkpoint else 0


def plan_resume(out: Path, *, mode: str, recipe_hash: str, data_digest: str) -> ResumePlan:
    """Decide, without changing anything on disk, whether this job resumes.

    It resumes only when ``mode`` is ``auto``, the previous attempt of the same recipe on the
    same data did not finish, and it left a complete checkpoint.
    """
    state = read_state(out)
    if mode == "never":
        return ResumePlan(reason="resume: never", stale_run_id=state.run_id if state and state.status == "running" else None)
    if state is None:
        return ResumePlan(reason="no earlier attempt")
    if state.status == "finished":
        return ResumePlan(reason=f"the earlier attempt finished (version {state.version}); training a new version")
    if state.recipe_hash != recipe_hash or state.data_digest != data_digest:
        return ResumePlan(reason="the recipe or the data changed since the interrupted attempt", stale_run_id=state.run_id)
    checkpoint = newest_complete(out / "checkpoints")
    if checkpoint is None:
        return ResumePlan(reason="the interrupted attempt left no complete checkpoint", stale_run_id=state.run_id)
    return ResumePlan(checkpoint=str(checkpoint), run_id=state.run_id, reason=f"resuming from {checkpoint.name}")
