"""One training job, end to end inside one process: data → trainer → MLflow run → version.

``TrainJob`` is what crosses a process boundary (launchers write it as JSON for the
training entry point), so it is a pydantic model holding only resolved values.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.settings import forgeline_home, tracking_uri

from .config import AdapterSpec, DataSpec, MethodSpec, ModelSpec, TrainSpec
from .data import DataSplit, load_data
from .models import load_base_model, load_tokenizer
from .sft import build_sft_trainer

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
    recipe_hash: str
    recipe_file: str | None = None
    experiment: str = "forgeline"
    actor: str = Field(default_factory=getpass.getuser, description="Who started the job (lineage; no self-approval).")
    output_dir: str | None = Field(default=None, description="Checkpoints and the final adapter; default under $FORGELINE_HOME/jobs.")

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else forgeline_home() / "jobs" / self.name / self.recipe_hash


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    version: VersionInfo
    adapter_dir: Path
    data: DataSplit
    train_loss: float | None


def _log_inputs(job: TrainJob, data: DataSplit) -> None:
    """Datasets (with digests) as MLflow run inputs, and the recipe file as an artifact."""
    import mlflow
    import pandas as pd

    for context, rows, source in (("training", data.train, data.sources[0]), ("evaluation", data.eval, data.sources[-1])):
        frame = pd.DataFrame({"row": [repr(r) for r in rows]})  # nested chat rows: keep schema flat
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{job.name}-{context}", digest=data.digest)
        mlflow.log_input(dataset, context=context)
    if job.recipe_file:
        mlflow.log_artifact(job.recipe_file, artifact_path="recipe")
    mlflow.log_dict(job.model_dump(mode="json"), "recipe/resolved.json")


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
    commit = lineage.git_commit(Path(job.recipe_file).parent if job.recipe_file else Path.cwd())
    if commit:
        tags[lineage.GIT_COMMIT] = commit
    return tags


def run_job(job: TrainJob, *, registry: Registry | None = None, callbacks: list[Any] | None = None) -> TrainResult:
    """Train, track and register one version.

    The run is started here so the Hugging Face MLflow callback logs params and per-step
    metrics into it instead of opening its own.
    """
    import mlflow

    registry = registry or Registry()
    data = load_data(job.data, seed=job.train.seed)
    tokenizer = load_tokenizer(job.model)
    model = load_base_model(job.model)
    out = job.resolved_output_dir()
    out.mkdir(parents=True, exist_ok=True)

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    os.environ.setdefault("HF_MLFLOW_LOG_ARTIFACTS", "false")  # we log the adapter ourselves, once
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = registry.ensure_experiment(job.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{job.name}-{job.method.kind}") as run:
        run_id = run.info.run_id
        mlflow.set_tags({"forgeline.name": job.name, "forgeline.recipe_hash": job.recipe_hash})
        _log_inputs(job, data)
        trainer = build_sft_trainer(
            model, tokenizer, job.method, job.adapter, job.train,
            train_rows=data.train, output_dir=str(out / "checkpoints"), report_to=["mlflow"], callbacks=callbacks,
        )
        result = trainer.train()
        adapter_dir = out / "adapter"
        tmp = out / "adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)  # atomic: a half-saved adapter is never picked up
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        source = f"{run.info.artifact_uri}/adapter"
        version = registry.create_version(
            job.name, source=source, run_id=run_id, tags=_lineage_tags(job, run_id, data),
            description=f"{job.method.kind} ({job.adapter.kind}) of {job.model.base}",
        )
    log.info("registered %s version %s from run %s", job.name, version.version, run_id)
    return TrainResult(run_id=run_id, version=version, adapter_dir=adapter_dir, data=data, train_loss=result.training_loss)
