"""The fine-tuning jobs API's logic: create, read, cancel, pause, resume, events, checkpoints.

The router (``forgeline.control.routers.fine_tuning``) is a thin layer over this;
:mod:`forgeline.finetune.supervisor` drives jobs forward in the background. Every call is
scoped to the caller's organisation: another organisation's job is reported as missing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import submission as launcher_jobs
from jobs.base import job_root
from jobs.config import ClusterSpec
from jobs.store import JobStore
from registry.client import Registry
from registry.errors import (
    ConfigError,
    ConflictError,
    ErrorCode,
    FieldProblem,
    ForgelineError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
)
from registry.keys import KeyRecord
from registry.policy import PolicyBook
from registry.settings import forgeline_home, tracking_uri
from training.checkpoints import checkpoint_step, complete_checkpoints
from training.cluster_job import check_cluster
from training.config import DistributedSpec

from ..stage_jobs import STAGES, stage_job_id
from .base_models import BaseModelStore
from .files import FileRecord, FileStore
from .formats import FileSummary, inspect_jsonl
from .jobs import ACTIVE, CANCELLED, PAUSED, QUEUED, FineTuningStore, JobRow, NewJob, new_id
from .protocol import CreateJobRequest
from .translate import Inputs, build_train_job

log = logging.getLogger(__name__)


class FineTuningSettings(BaseModel):
    """How the operator runs customers' jobs (``forgeline control serve --fine-tuning FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where jobs train (local, slurm, kubernetes, hostfile).")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Processes and sharding per job.")
    experiment: str = Field(default="fine-tuning", description="MLflow experiment of the jobs' runs (an mlflow integration may pick another).")
    poll_interval_s: float = Field(default=5.0, gt=0, description="How often the supervisor follows running jobs.")
    evaluate: bool = Field(default=True, description="Score supervised and reinforcement versions on their validation_file after training.")
    evaluate_suites: list[str] = Field(
        default_factory=list, description="Suite files every job's version is also scored on (docs/EVALUATION.md), e.g. general and safety."
    )
    build: bool = Field(default=True, description="Build the PyTorch serving artifact of each new version.")
    candidate_alias: str | None = Field(
        default="candidate", description="Alias a new version is moved to when the promotion policy allows it (None: never)."
    )

    def checked(self) -> FineTuningSettings:
        """These settings, or every problem with them (including ones only this machine can tell)."""
        problems = check_cluster(self.cluster, self.distributed)
        shared = self.cluster.shared_dir
        if shared and not os.environ.get("MLFLOW_TRACKING_URI") and \
                Path(shared).expanduser().resolve() != forgeline_home().resolve():
            # The nodes run with FORGELINE_HOME=shared_dir and, with no MLFLOW_TRACKING_URI to forward,
            # track into an embedded store there, not ours.
            problems.append(FieldProblem(
                "cluster.shared_dir", f"jobs would register their versions in {shared}/mlflow.db, which this "
                f"control plane ({tracking_uri()}) does not read", shared,
                "set MLFLOW_TRACKING_URI to a tracking server both reach, or run the control plane with "
                f"FORGELINE_HOME={shared}",
            ))
        embedded = tracking_uri().startswith(("sqlite:", "file:")) or "://" not in tracking_uri()
        if self.cluster.kind == "kubernetes" and embedded and \
                Path(self.cluster.mount_path).resolve() != forgeline_home().resolve():
            # Pods get no SQLite URI (a file on this machine); they track into <mount_path>/mlflow.db.
            problems.append(FieldProblem(
                "cluster.mount_path", f"pods would register their versions in {self.cluster.mount_path}/mlflow.db, "
                f"which this control plane ({tracking_uri()}) does not read", self.cluster.mount_path,
                "set MLFLOW_TRACKING_URI to a tracking server the pods reach, or run the control plane with "
                f"the jobs' volume mounted as FORGELINE_HOME={self.cluster.mount_path}",
            ))
        if problems:
            raise ConfigError(problems=problems, source="fine-tuning settings")
        return self


def load_settings(path: Path) -> FineTuningSettings:
    """Read the settings YAML; every problem is reported at once with its path.

    Raises:
        ConfigError: unreadable YAML, unknown fields or bad values.
    """
    import yaml

    from forgeline.recipe import problems_from_validation

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return FineTuningSettings.model_validate(raw).checked()
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(problems=[FieldProblem("<file>", str(err).replace("\n", " "), None, "fix the file")],
                          source=str(path)) from None
    except ValidationError as err:
        raise ConfigError(problems=problems_from_validation(err), source=str(path)) from None


def jobs_folder(cluster: ClusterSpec) -> Path:
    """Where job folders (converted data, checkpoints) go: a folder the training processes see
    at the same path. Slurm and hostfile: the cluster's shared_dir (else $FORGELINE_HOME);
    Kubernetes: the PVC's mount path, so the control plane must mount the jobs' PVC there too."""
    root = Path(cluster.mount_path) if cluster.kind == "kubernetes" else job_root(cluster)
    return root / "fine_tuning"


@dataclass
class FineTuning:
    """Everything the jobs API and its supervisor share."""

    store: FineTuningStore
    files: FileStore
    bases: BaseModelStore
    launches: JobStore
    registry: Registry
    policies: PolicyBook
    settings: FineTuningSettings

    # -- create ---------------------------------------------------------------------------------

    def create(self, request: CreateJobRequest, key: KeyRecord) -> JobRow:
        """Validate the request against the files and the base model, then queue the job.

        Raises:
            ForgelineError: unknown base model or file, a file that does not fit the
                method, hyper-parameters that do not fit (``invalid_request`` / 404, naming the field).
        """
        try:
            base = self.bases.get(request.model)
        except NotFoundError as err:
            raise NotFoundError(str(err), param="model") from None
        train = self._file(key.org, request.training_file, "training_file")
        validation = self._file(key.org, request.validation_file, "validation_file") if request.validation_file else None
        job_id = new_id("ftjob")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        experiment = request.integrations[0].mlflow.experiment if request.integrations else self.settings.experiment
        root = jobs_folder(self.settings.cluster) / job_id
        inputs = Inputs(
            train_path=train[0], train_summary=train[1],
            validation_path=validation[0] if validation else None, validation_summary=validation[1] if validation else None,
        )
        train_job, hyperparameters = build_train_job(
            request, job_id=job_id, org=key.org, actor=key.name, seed=seed, base=base, inputs=inputs, job_root=root,
            distributed=self.settings.distributed, experiment=experiment,
            local=self.settings.cluster.kind == "local",
        )
        if not key.allows_model(train_job.name):
            raise PermissionDeniedError(
                f"API key {key.prefix}… ({key.name}) may only act on models matching {key.models!r}; this job would "
                f"register {train_job.name!r}; fix: use a suffix your key covers, or a key for that model",
                param="suffix",
            )
        self._check_name_free(train_job.name, key.org)
        method = request.resolved_method()
        stored_method = {"type": method.type, method.type: {"hyperparameters": hyperparameters}}
        if method.type == "reinforcement":
            assert method.reinforcement is not None
            stored_method["reinforcement"]["grader"] = method.reinforcement.grader
        job = self.store.create(
            NewJob(
                id=job_id, org=key.org, created_by=key.name, model=base.name, training_file=request.training_file,
                validation_file=request.validation_file, method=stored_method,
                hyperparameters={k: hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
                suffix=request.suffix, seed=seed, registered_name=train_job.name,
                train_job=train_job.model_dump(mode="json"), cluster=self.settings.cluster.model_dump(mode="json"),
                integrations=[i.model_dump(mode="json") for i in request.integrations or []], metadata=request.metadata,
            ),
            first_events=[
                ("created", f"Created fine-tuning job: {job_id}"),
                ("validated", f"Validated training file {request.training_file} ({train[1].rows} {train[1].format} rows)"
                 + (f" and validation file {request.validation_file}" if validation else "")),
                ("queued", f"Job queued: {method.type} of {base.name} into {train_job.name}"),
            ],
        )
        log.info("fine-tuning job %s queued for %s (%s, org %s)", job_id, train_job.name, method.type, key.org)
        return job

    def _check_name_free(self, name: str, org: str) -> None:
        """Refuse a registered-model name another owner already uses.

        ``ft-<org>-<base>-<suffix>`` is not injective (org ``a-b`` on base ``c`` and org ``a``
        on base ``b-c`` meet), and a job must never add versions to another org's model.
        """
        owners = self.store.orgs_registering(name)
        try:
            # Untagged versions are skipped: the supervisor tags a version only after training registers it.
            owners |= {tag for tag in self.registry.version_orgs(name).values() if tag}
        except ModelNotFoundError:
            pass
        if owners - {org}:
            raise ConflictError(
                f"suffix: the fine-tuned model name {name!r} is already used by another owner; "
                "fix: choose a different `suffix`",
                param="suffix",
            )

    def _file(self, org: str, file_id: str | None, param: str) -> tuple[Path, FileSummary]:
        assert file_id is not None
        try:
            record = self.files.get(org, file_id)
        except NotFoundError:
            raise NotFoundError(f"{param}: no file {file_id!r}; fix: upload it with `client.files.create(..., "
                                "purpose='fine-tune')` and pass its id", param=param) from None
        if record.purpose != "fine-tune":
            raise ForgelineError(f"{param}: file {file_id} has purpose {record.purpose!r}; fix: upload it with "
                                 "purpose='fine-tune'", code=ErrorCode.INVALID_REQUEST, param=param)
        path = self.files.path(org, file_id)
        return path, inspect_jsonl(path, filename=record.filename)

    # -- deleting files ---------------------------------------------------------------------------

    def delete_file(self, org: str, file_id: str) -> tuple[FileRecord, list[str]]:
        """Delete a file and every copy of it in job folders, except where a job still needs it.

        Jobs copy their rows into their own folder (``data/train.jsonl``, ``data/eval.jsonl``)
        when created. Finished jobs' copies go at once; a queued, running or paused job keeps
        its copy until it finishes (the supervisor removes it then).

        Returns:
            The deleted file, and the ids of the jobs whose copy is kept for now.

        Raises:
            NotFoundError: no such live file in ``org``.
        """
        record = self.files.delete(org, file_id)
        retained = []
        for job in self.store.using_file(org, file_id):
            if job.finished:
                self._remove_copies(job, {file_id})
            else:
                retained.append(job.id)
                self.store.add_event(job.id, f"input-retained-{file_id}",
                                     f"File {file_id} was deleted; this job keeps its copy until it finishes")
        return record, retained

    def release_inputs(self, job: JobRow) -> None:
        """Remove a finished job's copies of the files deleted while it needed them."""
        if not job.finished:
            return
        deleted = {f for f in (job.training_file, job.validation_file) if f and self.files.is_deleted(job.org, f)}
        self._remove_copies(job, deleted)

    def _remove_copies(self, job: JobRow, file_ids: set[str]) -> None:
        data = job.train_job.get("data") or {}
        copies = [data.get("train")] if job.training_file in file_ids else []
        copies += [data.get("eval")] if job.validation_file and job.validation_file in file_ids else []
        for copy in filter(None, copies):
            path = Path(copy)
            if path.exists():
                path.unlink()
                self.store.add_event(job.id, f"input-removed-{path.name}",
                                     f"Removed {path.name}, the copy of a deleted file, from the job folder")
                log.info("job %s: removed %s (its file was deleted)", job.id, path)

    # -- read -----------------------------------------------------------------------------------

    def get(self, job_id: str, key: KeyRecord) -> JobRow:
        return self.store.get(job_id, org=key.org)

    def list(self, key: KeyRecord, *, after: str | None, limit: int,
             metadata: dict[str, str] | None = None) -> tuple[list[JobRow], bool]:
        return self.store.list_jobs(key.org, after=after, limit=limit, metadata_filter=metadata)

    def events(self, job_id: str, key: KeyRecord, *, after: str | None, limit: int) -> tuple[list[Any], bool]:
        self.get(job_id, key)
        return self.store.events(job_id, after=after, limit=limit)

    def checkpoints(self, job_id: str, key: KeyRecord, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Complete checkpoints still on disk, newest first, with the metrics logged at their step."""
        job = self.get(job_id, key)
        folder = self.output_dir(job) / "checkpoints"
        items = [_checkpoint_object(job, path) for path in reversed(complete_checkpoints(folder))]
        if after:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return items[:limit], len(items) > limit

    def output_dir(self, job: JobRow) -> Path:
        """Where the job's checkpoints are, as the launcher placed them (Kubernetes: on the PVC)."""
        if job.launcher_job_id:
            try:
                return Path(self.launches.get(job.launcher_job_id).handle.output_dir)
            except NotFoundError:
                pass
        return Path(job.train_job["output_dir"])

    # -- control --------------------------------------------------------------------------------

    def cancel(self, job_id: str, key: KeyRecord) -> JobRow:
        """Stop the job for good: its training processes are stopped (TERM, then KILL)."""
        job = self.get(job_id, key)
        if job.finished:
            raise ConflictError(f"job {job_id} already {job.status}; nothing to cancel", param="fine_tuning_job_id")
        if not self.store.transition(job_id, from_status=(*ACTIVE, PAUSED), status=CANCELLED):
            return self.cancel(job_id, key)  # moved meanwhile: decide again on the new status
        self._stop_training(job)
        self.store.add_event(job_id, "cancelled", f"Job cancelled by {key.name}")
        cancelled = self.get(job_id, key)
        self.release_inputs(cancelled)  # a paused job is not watched by the supervisor
        return cancelled

    def pause(self, job_id: str, key: KeyRecord) -> JobRow:
        """Stop training and keep its checkpoints; ``resume`` continues from the newest one."""
        job = self.get(job_id, key)
        if job.status not in ACTIVE:
            raise ConflictError(f"job {job_id} is {job.status}; only queued or running jobs can be paused",
                                param="fine_tuning_job_id")
        if not self.store.transition(job_id, from_status=ACTIVE, status=PAUSED):
            return self.pause(job_id, key)
        self._stop_training(job)
        self.store.add_event(job_id, f"paused-{job.attempt}", f"Job paused by {key.name}; checkpoints kept")
        return self.get(job_id, key)

    def resume(self, job_id: str, key: KeyRecord) -> JobRow:
        """Queue a paused job again as a new attempt (it resumes from its newest complete checkpoint)."""
        job = self.get(job_id, key)
        if job.status != PAUSED:
            raise ConflictError(f"job {job_id} is {job.status}; only paused jobs can be resumed", param="fine_tuning_job_id")
        attempt = job.attempt + 1
        if self.store.transition(job_id, from_status=(PAUSED,), status=QUEUED, attempt=attempt, launcher_job_id=None):
            self.store.add_event(job_id, f"resumed-{attempt}", f"Job resumed by {key.name} (attempt {attempt})")
        return self.get(job_id, key)

    def _stop_training(self, job: JobRow) -> None:
        """Cancel the attempt's jobs: its training, and the evaluation and build of its version if they run."""
        if not job.launcher_job_id:
            return
        for launcher_id in (job.launcher_job_id, *(stage_job_id(job.launcher_job_id, s) for s in STAGES)):
            try:
                launcher_jobs.cancel(launcher_id, store=self.launches)
            except NotFoundError:  # not submitted (yet): the supervisor will see the new status
                log.info("job %s: launcher job %s not submitted", job.id, launcher_id)


def _checkpoint_object(job: JobRow, path: Path) -> dict[str, Any]:
    step = checkpoint_step(path)
    metrics: dict[str, float] = {"step": float(step)}
    try:
        history = json.loads((path / "trainer_state.json").read_text()).get("log_history", [])
    except (OSError, ValueError):
        history = []
    names = {"loss": "train_loss", "eval_loss": "valid_loss", "mean_token_accuracy": "train_mean_token_accuracy",
             "eval_mean_token_accuracy": "valid_mean_token_accuracy"}
    for entry in history:
        if entry.get("step") == step:
            metrics.update({ours: float(entry[theirs]) for theirs, ours in names.items() if theirs in entry})
    return {
        "id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(path.stat().st_mtime),
        "fine_tuned_model_checkpoint": f"{job.registered_name}:ckpt-step-{step}",
        "fine_tuning_job_id": job.id,
        "metrics": metrics,
        "step_number": step,
    }

