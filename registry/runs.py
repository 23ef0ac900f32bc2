"""Runs, metrics and artifacts: the tracking half of the registry facade.

Code above ``registry/`` reads and writes MLflow runs only through these verbs (mixed into
`registry.client.Registry`), so it never holds an ``MlflowClient`` or catches an
``MlflowException``: failures arrive as the ``ForgelineError`` family. Runs come back as
:class:`RunInfo`, not MLflow entities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from registry.errors import NotFoundError
from registry.mlflow_errors import is_missing, translate


@dataclass(frozen=True)
class RunInfo:
    """What callers need of an MLflow run."""

    run_id: str
    status: str
    artifact_uri: str
    tags: dict[str, str] = field(hash=False)
    metrics: dict[str, float] = field(hash=False)
    params: dict[str, str] = field(hash=False)

    @classmethod
    def from_mlflow(cls, run: Run) -> RunInfo:
        return cls(
            run_id=run.info.run_id,
            status=str(run.info.status),
            artifact_uri=run.info.artifact_uri or "",
            tags=dict(run.data.tags or {}),
            metrics=dict(run.data.metrics or {}),
            params=dict(run.data.params or {}),
        )


def download_artifact_uri(uri: str, dst: str | Path, *, tracking_uri: str) -> Path:
    """Copy the artifact (file or folder) at ``uri`` into ``dst``; returns the local path.

    The tracking URI is explicit: ``mlflow-artifacts:`` URIs resolve through it, and
    long-running callers never set MLflow's global one.
    """
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))
    except MlflowException as exc:
        raise translate(exc, f"could not download {uri}", param="artifact") from exc


class RunRecords:
    """Run, metric and artifact verbs over ``client`` (provided by the facade)."""

    client: MlflowClient

    def get_run(self, run_id: str) -> RunInfo:
        """One run.

        Raises:
            NotFoundError: there is no run ``run_id``.
        """
        try:
            return RunInfo.from_mlflow(self.client.get_run(run_id))
        except MlflowException as exc:
            if is_missing(exc):
                raise NotFoundError(f"no MLflow run {run_id!r}", param="run_id") from exc
            raise translate(exc, f"could not read run {run_id!r}", param="run_id") from exc

    def find_run(self, experiment: str, *, tag: str, value: str) -> RunInfo | None:
        """The newest run of ``experiment`` whose tag ``tag`` is ``value``; None when there is none."""
        experiment_entity = self.client.get_experiment_by_name(experiment)
        if experiment_entity is None:
            return None
        quote = '"' if "'" in value else "'"
        try:
            runs = self.client.search_runs(
                [experiment_entity.experiment_id], filter_string=f"tags.`{tag}` = {quote}{value}{quote}", max_results=1
            )
        except MlflowException as exc:
            raise translate(exc, f"could not search the runs of {experiment!r}", param="experiment") from exc
        return RunInfo.from_mlflow(runs[0]) if runs else None

    def metric_points(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """One metric a run logged, as ``(step, value)`` pairs in step order (empty when never logged)."""
        try:
            return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))
        except MlflowException as exc:
            if is_missing(exc):
                raise NotFoundError(f"no MLflow run {run_id!r}", param="run_id") from exc
            raise translate(exc, f"could not read {key!r} of run {run_id!r}", param="run_id") from exc

    def metric_history(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric a run logged, as ``(step, value)`` pairs in step order.

        Raises:
            NotFoundError: there is no run ``run_id``.
        """
        return {key: self.metric_points(run_id, key) for key in self.get_run(run_id).metrics}

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        """Log each metric on the run (at ``step``, default 0)."""
        try:
            for key, value in metrics.items():
                self.client.log_metric(run_id, key, float(value), step=step)
        except MlflowException as exc:
            raise translate(exc, f"could not log metrics on run {run_id!r}", param="run_id") from exc

    def log_table(self, run_id: str, data: dict[str, list[Any]], artifact_file: str) -> None:
        """Store ``data`` (columns of equal length) as an MLflow table artifact of the run."""
        try:
            self.client.log_table(run_id, data=data, artifact_file=artifact_file)
        except MlflowException as exc:
            raise translate(exc, f"could not store {artifact_file} on run {run_id!r}", param="run_id") from exc

    def upload_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        """Upload a folder under ``artifact_path`` of the run; returns its artifact URI."""
        try:
            self.client.log_artifacts(run_id, str(local_dir), artifact_path=artifact_path)
            return f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        except MlflowException as exc:
            raise translate(exc, f"could not upload {local_dir} to run {run_id!r}", param="run_id") from exc

    def download_run_artifact(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Copy the run's artifact ``path`` into ``dst``; returns the local path."""
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except MlflowException as exc:
            raise translate(exc, f"could not download {path} of run {run_id!r}", param="artifact") from exc

    def end_run(self, run_id: str, *, status: str = "FINISHED") -> None:
        """Mark a run ended (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        try:
            self.client.set_terminated(run_id, status=status)
        except MlflowException as exc:
            raise translate(exc, f"could not end run {run_id!r}", param="run_id") from exc
