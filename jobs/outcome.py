"""What a job leaves behind for whoever follows it: ``result.json`` in its output folder.

A training job's rank 0 writes it once its version is registered; the launchers read it
back to report the version (``with_outcome``) and the foreground runner to return it. The
file decides the outcome: a job whose version is registered has succeeded, whatever a
process did afterwards.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from .base import JobHandle, JobPhase, JobStatus

RESULT_FILE = "result.json"


class JobOutcome(BaseModel):
    """The registered version a job reports (stages add their own fields)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    run_id: str | None = None
    resumed_from_step: int = 0


Outcome = TypeVar("Outcome", bound=JobOutcome)


def read_outcome(output_dir: Path, model: type[Outcome] = JobOutcome) -> Outcome | None:  # type: ignore[assignment]
    """What the job wrote into ``output_dir/result.json``, or None when it is missing or unreadable here."""
    path = output_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text())
    except ValueError:
        return None


def outcome_predates(handle: JobHandle, output_dir: Path) -> bool:
    """A result.json older than the job is an earlier job's result (same recipe, same folder)."""
    path = output_dir / RESULT_FILE
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC) < handle.submitted_at
    except OSError:
        return True


def with_outcome(status: JobStatus, handle: JobHandle) -> JobStatus:
    """Add the registered version (from ``result.json``) to a status, when the job wrote one.

    The result file decides the outcome: a job whose version is registered has succeeded,
    even when a process exited non-zero afterwards (a rank aborting at exit, a node lost
    during teardown). Reporting it failed would invite a rerun that trains it again.
    """
    outcome = read_outcome(Path(handle.output_dir))
    if outcome is None or outcome_predates(handle, Path(handle.output_dir)):
        return status
    update: dict[str, object] = {
        "version": outcome.version, "run_id": outcome.run_id, "resumed_from_step": outcome.resumed_from_step,
    }
    if status.phase is JobPhase.FAILED:
        update["phase"] = JobPhase.SUCCEEDED
        update["detail"] = f"version {outcome.version} registered; a process then {status.detail} (ignored)"
    return status.model_copy(update=update)
