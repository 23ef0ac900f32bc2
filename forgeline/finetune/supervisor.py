"""Drives fine-tuning jobs forward in the background of the control plane.

Each pass, for every queued or running job: submit it through the launcher (once: the
launcher job id ``<job>-<attempt>`` is reserved in the database before submitting, and a
reserved id that the launcher store already knows is adopted, not submitted again),
follow the launcher's status, turn the run's MLflow metrics and the checkpoints on disk
into events, and when training registered a version: evaluate it and build its serving
artifact as jobs on the same launcher as the training (``forgeline evaluate`` and
``forgeline build`` in their own processes, on the cluster: no model is ever loaded in
the control plane), follow them, move the version to the candidate alias if the
promotion policy allows, and mark the job succeeded. The evaluation and build jobs' ids
(``<job>-<attempt>-evaluate|build``) are reserved by an event before they are submitted,
and a reserved id the launcher store already knows is adopted, as for training attempts.
Every step is keyed by an event, so a control plane killed anywhere in between picks up
where it stopped: nothing is lost, nothing runs twice.

All state is in the database and the launchers, so the supervisor holds nothing a
restart could lose; two control planes on one database would both follow the jobs
(event keys keep the log single), but run one supervisor per database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from jobs import submission as launcher_jobs
from jobs.base import JobPhase, JobSpec
from jobs.config import ClusterSpec
from jobs.store import JobRecord
from registry import lineage
from registry.errors import ForgelineError, ModelNotFoundError, NotFoundError, PolicyRefused
from registry.runs import RunInfo
from training.checkpoints import checkpoint_step, complete_checkpoints
from training.cluster_job import train_spec
from training.job import TrainJob

from ..stage_jobs import build_spec, evaluate_spec, stage_job_id
from .jobs import ACTIVE, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRow
from .service import FineTuning
from .translate import JOB_TAG

log = logging.getLogger(__name__)

_SUCCESS_GRACE_POLLS = 5
"""Polls a succeeded launcher job may take to report its version (result.json on a shared file system)."""


class Supervisor:
    """A daemon thread calling :meth:`tick` every ``settings.poll_interval_s``."""

    def __init__(self, ft: FineTuning) -> None:
        self.ft = ft
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting_for_version: dict[str, int] = {}
        self._active: set[str] | None = None  # job ids active at the last pass; None before the first

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fine-tuning-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.ft.settings.poll_interval_s)

    def tick(self) -> None:
        """One pass over the active jobs; a failure on one job is logged and does not stop the others."""
        try:
            jobs = self.ft.store.active()
        except Exception:  # the database may be briefly unreachable; try again next pass
            log.exception("cannot list fine-tuning jobs")
            return
        self._release_left(jobs)
        for job in jobs:
            if self._stop.is_set():
                return
            try:
                self._advance(job)
            except Exception:
                log.exception("fine-tuning job %s: supervisor pass failed; retrying next pass", job.id)

    def _release_left(self, jobs: list[JobRow]) -> None:
        # Jobs that stopped being active since the last pass (finished here, or cancelled through
        # the API) give up the copies of files deleted while they ran.
        active = {job.id for job in jobs}
        left, self._active = (self._active or set()) - active, active
        for job_id in sorted(left):
            try:
                self.ft.release_inputs(self.ft.store.get(job_id))
            except Exception:
                log.exception("fine-tuning job %s: cannot remove copies of deleted files", job_id)

    # -- one job ----------------------------------------------------------------------------

    def _advance(self, job: JobRow) -> None:
        if job.launcher_job_id is None:
            self._submit(job)
            return
        try:
            record = launcher_jobs.refresh(job.launcher_job_id, store=self.ft.launches)
        except NotFoundError:  # reserved, then the control plane stopped before submitting
            self._submit(job)
            return
        except ForgelineError as err:  # the scheduler cannot answer now
            log.warning("fine-tuning job %s: cannot refresh %s: %s", job.id, job.launcher_job_id, err)
            return
        phase = record.status.phase
        if phase in (JobPhase.RUNNING, JobPhase.REQUEUED, JobPhase.SUCCEEDED) and job.status == QUEUED:
            if self.ft.store.transition(job.id, from_status=(QUEUED,), status=RUNNING):
                self.ft.store.add_event(job.id, f"started-{job.attempt}", "Fine-tuning job started")
        if phase is JobPhase.REQUEUED or record.status.restarts:
            self.ft.store.add_event(job.id, f"restart-{job.attempt}-{record.status.restarts}",
                                    f"Training restarted by the scheduler ({record.status.detail}); resuming from "
                                    "the newest complete checkpoint", level="warn")
        self._report_progress(job, Path(record.handle.output_dir))
        if phase is JobPhase.SUCCEEDED:
            if record.status.version is None:
                self._await_version(job, record)
            else:
                self._finish(job, record)
        elif phase is JobPhase.FAILED:
            self._fail(job, record)
        elif phase is JobPhase.CANCELLED and self.ft.store.transition(job.id, from_status=ACTIVE, status=CANCELLED):
            self.ft.store.add_event(job.id, "cancelled", f"Training was cancelled on the cluster ({record.status.detail})",
                                    level="warn")

    def _submit(self, job: JobRow) -> None:
        launcher_id = job.launcher_job_id or f"{job.id}-{job.attempt}"
        if job.launcher_job_id is None and not self.ft.store.transition(
            job.id, from_status=(QUEUED,), launcher_job_id=launcher_id
        ):
            return  # cancelled or paused meanwhile
        try:
            self.ft.launches.get(launcher_id)
            return  # submitted before a restart: follow it from the next pass
        except NotFoundError:
            pass
        train_job = TrainJob.model_validate(job.train_job)
        cluster = ClusterSpec.model_validate(job.cluster)
        try:
            launcher_jobs.submit(train_spec(train_job, cluster, job_id=launcher_id), store=self.ft.launches,
                                 actor=train_job.actor or job.created_by)
        except ForgelineError as err:
            self._set_failed(job, "submission_failed", f"the cluster refused the training job: {err}")
            return
        self.ft.store.add_event(job.id, f"submitted-{job.attempt}",
                                f"Training submitted to {cluster.kind} as {launcher_id}",
                                data={"launcher_job_id": launcher_id, "cluster": cluster.kind})
        if self.ft.store.get(job.id).status not in ACTIVE:  # cancelled or paused while we submitted
            launcher_jobs.cancel(launcher_id, store=self.ft.launches)

    def _await_version(self, job: JobRow, record: JobRecord) -> None:
        polls = self._waiting_for_version.get(job.id, 0) + 1
        self._waiting_for_version[job.id] = polls
        if polls > _SUCCESS_GRACE_POLLS:
            self._set_failed(job, "no_version", "training exited 0 but did not report a registered version "
                             f"(no result.json in {record.handle.output_dir})")

    def _fail(self, job: JobRow, record: JobRecord) -> None:
        self._set_failed(job, "training_failed", f"training failed {self._job_failure(record)}"[:2000])

    def _set_failed(self, job: JobRow, code: str, message: str) -> None:
        error = {"code": code, "message": message, "param": None}
        if self.ft.store.transition(job.id, from_status=ACTIVE, status=FAILED, error=error):
            self.ft.store.add_event(job.id, "failed", f"Job failed: {message}", level="error")

    # -- progress -----------------------------------------------------------------------------

    def _run(self, job: JobRow) -> RunInfo | None:
        """The job's MLflow run (found by its tag; remembered once found)."""
        registry = self.ft.registry
        if job.run_id:
            try:
                return registry.get_run(job.run_id)
            except ForgelineError:  # tracked somewhere this control plane does not read
                return None
        run = registry.find_run(job.train_job.get("experiment", "forgeline"), tag=JOB_TAG, value=job.id)
        if run is None:
            return None
        self.ft.store.transition(job.id, from_status=ACTIVE, run_id=run.run_id)
        return run

    def _report_progress(self, job: JobRow, output_dir: Path) -> None:
        """Metrics logged on the run and checkpoints written so far, as events (each once)."""
        store = self.ft.store
        known = store.event_keys(job.id)
        run = self._run(job)
        if run is not None:
            planned = run.tags.get(lineage.TOTAL_STEPS, "")
            total = int(planned) if planned.isdigit() else None
            for metric, label, kind in (("loss", "training loss", "train_loss"), ("eval_loss", "validation loss", "valid_loss")):
                for step, value in self.ft.registry.metric_points(run.run_id, metric):
                    key = f"{kind}-{step}"
                    if key not in known:
                        store.add_event(job.id, key, f"Step {step}/{total or '?'}: {label}={value:.4f}",
                                        type="metrics", data={"step": step, kind: value, "total_steps": total})
        for path in complete_checkpoints(output_dir / "checkpoints"):
            step = checkpoint_step(path)
            if f"checkpoint-{step}" not in known:
                store.add_event(job.id, f"checkpoint-{step}", f"Checkpoint created at step {step}", data={"step": step})

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, job: JobRow, record: JobRecord) -> None:
        """Evaluate and build the new version as jobs, alias it (policy permitting), then mark the job succeeded.

        Called on every pass until the job is done: a pass that finds the evaluation or build
        job still running returns and looks again on the next one.
        """
        ft, store = self.ft, self.ft.store
        name, version = job.registered_name, record.status.version
        assert version is not None
        known = store.event_keys(job.id)
        if "model-created" not in known:
            store.transition(job.id, from_status=ACTIVE, version=version, run_id=record.status.run_id)
            # Before anything can serve it: the gateway serves a version tagged with an org to that org's keys only.
            try:
                ft.registry.set_tags(name, version, {lineage.ORG: job.org, lineage.FINE_TUNING_JOB: job.id})
            except (NotFoundError, ModelNotFoundError):
                self._set_failed(job, "no_version", f"training reported {name} version {version}, but the registry this "
                                 f"control plane reads ({ft.registry.tracking_uri}) has no such version; fix: point the "
                                 "cluster and the control plane at one MLflow tracking server (MLFLOW_TRACKING_URI)")
                return
            store.add_event(job.id, "model-created", f"New fine-tuned model created: {name} version {version}",
                            data={"registered_model": name, "version": version})
            known = store.event_keys(job.id)
        waiting = False
        if ft.settings.evaluate and "evaluated" not in known:
            waiting |= not self._evaluate(job, name, version, known)
        if ft.settings.build and "built" not in known:
            waiting |= not self._build(job, name, version, known)
        if waiting:
            return  # an evaluation or build job still runs; the next pass looks again
        alias = ft.settings.candidate_alias
        if alias and not known & {"candidate", "candidate-refused"}:
            from forgeline.pipeline import promote_version  # registry work only: no model is loaded here

            try:
                promote_version(ft.registry, name, version, ft.policies.for_model(name), alias=alias,
                                actor=job.created_by, reason=f"fine-tuning job {job.id} succeeded")
                store.add_event(job.id, "candidate", f"{name} version {version} is now {name}@{alias}")
            except PolicyRefused as err:
                store.add_event(job.id, "candidate-refused", f"Not moved to @{alias}: {err}", level="warn")
        tokens = self._trained_tokens(job)
        if store.transition(job.id, from_status=ACTIVE, status=SUCCEEDED, fine_tuned_model=name, trained_tokens=tokens):
            store.add_event(job.id, "succeeded", "The job has successfully completed")

    def _trained_tokens(self, job: JobRow) -> int | None:
        """The tokens the training job counted (a tag on its run; None when it could not count them)."""
        run = self._run(job)
        value = run.tags.get(lineage.TRAINED_TOKENS, "") if run is not None else ""
        return int(value) if value.isdigit() else None

    def _stage_job(self, job: JobRow, stage: str, known: set[str], make_spec: Callable[[str, ClusterSpec], JobSpec],
                   what: str) -> JobRecord | str | None:
        """The evaluation or build job of ``job``'s version: submitted once, then followed.

        Returns the job's record once it ended, an error message when it could not be
        submitted, or None while it runs (or was just submitted).
        """
        launcher_id = stage_job_id(f"{job.id}-{job.attempt}", stage)
        cluster = ClusterSpec.model_validate(job.cluster)
        if f"{stage}-job" not in known:  # reserve the id before submitting, so a restart adopts the job
            self.ft.store.add_event(job.id, f"{stage}-job", f"{what} runs as job {launcher_id} on {cluster.kind}",
                                    data={"launcher_job_id": launcher_id, "cluster": cluster.kind})
        try:
            record = launcher_jobs.refresh(launcher_id, store=self.ft.launches)
        except NotFoundError:  # reserved, not submitted yet (or the control plane stopped in between)
            try:
                launcher_jobs.submit(make_spec(launcher_id, cluster), store=self.ft.launches, actor=job.created_by)
            except ForgelineError as err:
                return f"the cluster refused the {stage} job: {err}"
            return None
        except ForgelineError as err:  # the scheduler cannot answer now
            log.warning("fine-tuning job %s: cannot refresh %s: %s", job.id, launcher_id, err)
            return None
        return record if record.status.phase.finished else None

    def _job_failure(self, record: JobRecord) -> str:
        """Why a job ended without success (the scheduler's words), with the last lines of its log."""
        try:
            tail = launcher_jobs.job_logs(record.id, tail=15, store=self.ft.launches)
        except ForgelineError:
            tail = ""
        last = [line for line in tail.splitlines() if line.strip()][-3:]
        return f"({record.status.detail})" + (": " + " | ".join(last) if last else "")

    def _evaluate(self, job: JobRow, name: str, version: int, known: set[str]) -> bool:
        """Drive the evaluation job one step; True once its outcome is an event."""
        store = self.ft.store
        # Supervised: exact match of answers; reinforcement: the job's graders as rewards, pass@k.
        if job.method.get("type") not in ("supervised", "reinforcement") or not job.validation_file:
            store.add_event(job.id, "evaluated", "Not evaluated: scoring needs a supervised or reinforcement job with "
                            "a validation_file")
            return True
        # The operator's suites, as files the job reads (a cluster needs them on its shared filesystem).
        suite_options = [o for s in self.ft.settings.evaluate_suites for o in ("--suite", str(Path(s).resolve()))]
        ended = self._stage_job(job, "evaluate", known,
                                lambda job_id, cluster: evaluate_spec(name, version, cluster, job_id=job_id, options=suite_options),
                                "Evaluation")
        if ended is None:
            return False
        if isinstance(ended, str) or ended.status.phase is not JobPhase.SUCCEEDED:
            # The version stands; evaluation can be run again by hand.
            why = ended if isinstance(ended, str) else f"job {ended.id} {ended.status.phase.value} {self._job_failure(ended)}"
            store.add_event(job.id, "evaluated", f"Evaluation failed ({why[:1500]}); fix: run `forgeline evaluate {name} "
                            f"{version}`", level="warn")
            return True
        info = self.ft.registry.get_version(name, version)
        metrics, base_metrics = info.metrics(), info.base_metrics()
        shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()))
        base = ", ".join(f"{k}={v:.3f}" for k, v in sorted(base_metrics.items()))
        store.add_event(job.id, "evaluated", f"Evaluated on the validation file: {shown} (base model: {base})",
                        type="metrics", data={"metrics": metrics, "base_metrics": base_metrics,
                                              "launcher_job_id": ended.id})
        return True

    def _build(self, job: JobRow, name: str, version: int, known: set[str]) -> bool:
        """Drive the torch build job one step; True once its outcome is an event."""
        store = self.ft.store
        ended = self._stage_job(job, "build", known, lambda job_id, cluster: build_spec(name, version, cluster, job_id=job_id),
                                "Serving artifact build")
        if ended is None:
            return False
        artifact = None
        if not isinstance(ended, str) and ended.status.phase is JobPhase.SUCCEEDED:
            artifact = self.ft.registry.get_version(name, version).tags.get(lineage.engine_tag("torch"))
        if artifact is None:  # the version stands; the build can be run again by hand
            why = ended if isinstance(ended, str) else f"job {ended.id} {ended.status.phase.value} {self._job_failure(ended)}"
            store.add_event(job.id, "built", f"Serving artifact not built ({why[:1500]}); fix: run "
                            f"`forgeline build {name}@{version}`", level="warn")
            return True
        store.add_event(job.id, "built", f"Serving artifact built (torch engine) for {name} version {version}",
                        data={"artifact": artifact, "launcher_job_id": ended.id})
        return True
