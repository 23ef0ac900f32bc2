"""One training job, end to end: data → TRL trainer → MLflow run → adapter → registered version.

``TrainJob`` is what crosses a process boundary (launchers write it as JSON for the
training entry point, ``python -m training.entry``), so it is a pydantic model holding
only resolved values. ``run_job`` runs in every process of a job; rank 0 alone talks to
MLflow and the registry, so a multi-process job still makes one run and one version.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.outcome import RESULT_FILE
from jobs.outcome import JobOutcome as _JobOutcome
from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ConfigError, ModelNotFoundError, NotFoundError
from registry.settings import forgeline_home, private_dir, tracking_uri

from .adapters import quantization_config
from .checkpoints import (
    JobState,
    ResumePlan,
    discard_incomplete,
    mark_complete_callback,
    plan_resume,
    write_atomic,
    write_state,
)
from .config import AdapterSpec, DataSpec, DistributedSpec, EvaluateSpec, MethodSpec, ModelSpec, TrainSpec
from .data import DataSplit, load_data
from .distributed import barrier, is_main_process, trainer_kwargs, write_deepspeed_config
from .methods import TrainerInputs, build_config, build_trainer
from .models import load_base_model, load_tokenizer
from .preflight import check_training
from .tokens import trained_tokens

log = logging.getLogger(__name__)



class TrainJob(BaseModel):
    """Everything a training process needs, already validated and resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered model name the result becomes a version of.")
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    adapter: AdapterSpec
    train: TrainSpec
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    recipe_hash: str
    recipe_file: str | None = None
    experiment: str = "forgeline"
    actor: str = Field(default_factory=getpass.getuser, description="Who started the job (lineage; no self-approval).")
    output_dir: str | None = Field(default=None, description="Checkpoints and the final adapter; default under $FORGELINE_HOME/jobs.")
    run_tags: dict[str, str] = Field(
        default_factory=dict, description="Extra tags on the MLflow run (e.g. the fine-tuning job that asked for it)."
    )

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else forgeline_home() / "jobs" / self.name / self.recipe_hash

    def search_path(self) -> Path | None:
        """The recipe's folder: user reward modules are imported from there."""
        return Path(self.recipe_file).parent if self.recipe_file else None


class JobOutcome(_JobOutcome):
    """What rank 0 leaves in ``result.json`` for the launcher that started the job."""

    run_id: str
    adapter_dir: str
    train_loss: float | None = None
    resumed_from_step: int = 0


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    version: VersionInfo
    adapter_dir: Path
    data: DataSplit
    train_loss: float | None
    resumed_from_step: int = 0


def _log_inputs(job: TrainJob, data: DataSplit, out: Path) -> None:
    """Datasets (with digests) as MLflow run inputs, the recipe and DeepSpeed config as artifacts."""
    import mlflow
    import pandas as pd

    for context, rows, source in (("training", data.train, data.sources[0]), ("evaluation", data.eval, data.sources[-1])):
        frame = pd.DataFrame({"row": [repr(r) for r in rows]})  # nested chat rows: keep schema flat
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{job.name}-{context}", digest=data.digest)
        mlflow.log_input(dataset, context=context)
    if job.recipe_file:
        mlflow.log_artifact(job.recipe_file, artifact_path="recipe")
    mlflow.log_dict(job.model_dump(mode="json"), "recipe/resolved.json")
    if (out / "deepspeed.json").is_file():
        mlflow.log_artifact(str(out / "deepspeed.json"), artifact_path="recipe")


def _lineage_tags(job: TrainJob, run_id: str, data: DataSplit) -> dict[str, str]:
    tags = {
        lineage.BASE_MODEL: job.model.base,
        lineage.METHOD: job.method.kind,
        lineage.ADAPTER: job.adapter.kind,
        lineage.RECIPE_HASH: job.recipe_hash,
        lineage.DATASET_DIGEST: data.digest,
        lineage.RUN_ID: run_id,
        lineage.TRAINED_BY: job.actor,
        lineage.DATA_TRAIN: data.sources[0],
        lineage.DATA_EVAL: data.sources[-1],
    }
    # The code that trained the version: forgeline's own checkout, else the recipe's repo.
    commit = lineage.git_commit(Path(__file__).parent) or (
        lineage.git_commit(Path(job.recipe_file).parent) if job.recipe_file else None
    )
    if commit:
        tags[lineage.GIT_COMMIT] = commit
    return tags


def _registered_for_run(registry: Registry, name: str, run_id: str) -> VersionInfo | None:
    """The version an earlier attempt of this run already registered (a kill after registering)."""
    try:
        versions = registry.list_versions(name)
    except (ModelNotFoundError, NotFoundError):
        return None
    return next((v for v in versions if v.run_id == run_id), None)


def _start_run(job: TrainJob, plan: ResumePlan, registry: Registry) -> Any:
    """The MLflow run of this attempt: the interrupted one when resuming, else a new one."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    os.environ.setdefault("HF_MLFLOW_LOG_ARTIFACTS", "false")  # we log the adapter ourselves, once
    # The HF callback would open a second run if this were set while ours is active.
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = registry.ensure_experiment(job.experiment)
    if plan.stale_run_id:
        try:
            registry.end_run(plan.stale_run_id, status="KILLED")
        except Exception as err:  # best effort: the stale run may have been deleted by hand
            log.debug("could not mark run %s killed: %s", plan.stale_run_id, err)
    if plan.run_id:
        return mlflow.start_run(run_id=plan.run_id)
    return mlflow.start_run(experiment_id=experiment_id, run_name=f"{job.name}-{job.method.kind}")


def _for_inference(model: Any) -> None:
    """Turn training-only settings off before the config is saved with full weights.

    TRL turns a mixture-of-experts model's ``output_router_logits`` on for its load-balancing
    loss; saved that way, every later forward computes that loss too, and transformers'
    ``generate`` fails in it on batched prompts (Qwen2-MoE, transformers 5.24: a shape
    mismatch between the attention mask and the router logits).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "output_router_logits", False):
        text.output_router_logits = False


def _save_adapter(trainer: Any, tokenizer: Any, out: Path, main: bool) -> Path:
    """Save the final adapter (or model) atomically: a half-saved one is never picked up."""
    adapter_dir = out / "adapter"
    tmp = out / "adapter.partial"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    _for_inference(trainer.model)
    trainer.save_model(str(tmp))  # collective under ZeRO-3 (weights are gathered); rank 0 writes
    if main:
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
    return adapter_dir


def total_steps_callback() -> Any:
    """Tags the run with the optimiser steps planned (``forgeline.total_steps``), so followers
    of the run (the fine-tuning API's events) can say "step 10/75" without redoing the arithmetic."""
    import mlflow
    from transformers import TrainerCallback

    class TotalSteps(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and mlflow.active_run() is not None:
                mlflow.set_tag(lineage.TOTAL_STEPS, str(state.max_steps))

    return TotalSteps()


def _log_best(trainer: Any) -> None:
    import mlflow

    state = trainer.state
    if state.best_model_checkpoint:
        mlflow.set_tag(lineage.BEST_CHECKPOINT, Path(state.best_model_checkpoint).name)
        mlflow.log_metric(f"best_{trainer.args.metric_for_best_model}".replace("/", "_"), float(state.best_metric))


def run_job(job: TrainJob, *, registry: Registry | None = None, callbacks: list[Any] | None = None) -> TrainResult | None:
    """Train, track and register one version; resumes an interrupted attempt (``train.resume``).

    Returns:
        The result on rank 0; None on the other ranks of a multi-process job.

    Raises:
        ConfigError: the job cannot run here (cross-section or machine checks).
        DataError: rows do not match the method's format (nothing trained).
    """
    import mlflow

    main = is_main_process()
    problems = check_training(job.method, job.adapter, job.train, job.distributed, search_path=job.search_path())
    if problems:
        raise ConfigError(problems=problems, source=f"training job {job.name}")
    data = load_data(job.data, seed=job.train.seed, method=job.method)
    out = job.resolved_output_dir()
    private_dir(out)  # checkpoints and data of the job: its owner's only
    checkpoints = out / "checkpoints"
    plan = plan_resume(out, mode=job.train.resume, recipe_hash=job.recipe_hash, data_digest=data.digest)

    tokenizer = load_tokenizer(job.model)
    backend = trainer_kwargs(job.distributed)
    inputs = TrainerInputs(
        model=None, tokenizer=tokenizer, adapter=job.adapter, train=job.train, evaluate=job.evaluate,
        train_rows=data.train, eval_rows=data.eval, output_dir=str(checkpoints), report_to=["mlflow"],
        backend=backend, callbacks=[mark_complete_callback(), total_steps_callback(), *(callbacks or [])],
        search_path=job.search_path(),
    )
    # Arguments before weights: under ZeRO-3 the HF integration then loads the model already sharded.
    args = build_config(job.method, inputs)
    inputs.model = load_base_model(job.model, quantization=quantization_config(job.adapter))
    trainer = build_trainer(job.method, inputs, args)
    barrier()  # every rank has read the old state before rank 0 changes it
    if main:
        if plan.checkpoint is None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        else:
            discard_incomplete(checkpoints)
        if job.distributed.strategy == "deepspeed":
            write_deepspeed_config(backend["deepspeed"], out)
    log.info("%s: %s", job.name, plan.reason)

    registry = registry or (Registry() if main else None)
    run_context = _start_run(job, plan, registry) if main and registry else nullcontext()
    with run_context as run:
        run_id = run.info.run_id if run is not None else ""
        if main:
            write_state(out, JobState(run_id=run_id, recipe_hash=job.recipe_hash, data_digest=data.digest))
            mlflow.set_tags({lineage.RUN_NAME: job.name, lineage.RECIPE_HASH: job.recipe_hash, **job.run_tags})
            if plan.checkpoint:
                mlflow.set_tag(lineage.RESUMED_FROM_STEP, str(plan.step))
            else:
                _log_inputs(job, data, out)
        result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        adapter_dir = _save_adapter(trainer, tokenizer, out, main)
        if not main or registry is None:
            return None
        _log_best(trainer)
        tokens = trained_tokens(job.method, job.train, data.train, tokenizer)
        if tokens is not None:  # for whoever bills the job (the fine-tuning API), without a tokenizer of its own
            mlflow.set_tag(lineage.TRAINED_TOKENS, str(tokens))
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        version = _registered_for_run(registry, job.name, run_id) or registry.create_version(
            job.name, source=f"{run.info.artifact_uri}/adapter", run_id=run_id, tags=_lineage_tags(job, run_id, data),
            description=f"{job.method.kind} ({job.adapter.kind}) of {job.model.base}",
        )
    write_state(out, JobState(run_id=run_id, recipe_hash=job.recipe_hash, data_digest=data.digest,
                              status="finished", version=version.version))
    outcome = JobOutcome(run_id=run_id, name=job.name, version=version.version, adapter_dir=str(adapter_dir),
                         train_loss=result.training_loss, resumed_from_step=plan.step)
    write_atomic(out / RESULT_FILE, outcome.model_dump_json(indent=2) + "\n")
    log.info("registered %s version %s from run %s", job.name, version.version, run_id)
    return TrainResult(run_id=run_id, version=version, adapter_dir=adapter_dir, data=data,
                       train_loss=result.training_loss, resumed_from_step=plan.step)
