"""The stages a recipe goes through, each usable on its own and chained by ``quickstart``.

Only this package knows training, registry and serving together; each stage is a plain
function over the registry so the CLI, the control plane and tests share one code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError
from registry.policy import PromotionPolicy
from registry.promotion import PolicyResult, check_policy, promote
from registry.settings import forgeline_home
from training.config import EvaluateSpec, ModelSpec
from training.job import TrainJob, TrainResult, run_job

from .recipe import Recipe, recipe_hash

log = logging.getLogger(__name__)


def job_from_recipe(recipe: Recipe, recipe_file: str | Path | None) -> TrainJob:
    """The training job a recipe describes."""
    return TrainJob(
        name=recipe.name,
        model=recipe.model,
        data=recipe.data,
        method=recipe.method,
        adapter=recipe.adapter,
        train=recipe.train,
        recipe_hash=recipe_hash(recipe),
        recipe_file=str(Path(recipe_file).resolve()) if recipe_file else None,
    )


def train(recipe: Recipe, recipe_file: str | Path | None, *, registry: Registry) -> TrainResult:
    """Train and register one version (stages: train, track, register)."""
    return run_job(job_from_recipe(recipe, recipe_file), registry=registry)


def download_artifacts(uri: str, kind: str, name: str, version: int) -> Path:
    """A local copy of a version's artifact folder (a no-op copy on the embedded store)."""
    import mlflow

    dst = forgeline_home() / "cache" / name / str(version) / kind
    if (dst / ".complete").exists():
        return dst / Path(uri.rstrip("/")).name
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    (dst / ".complete").touch()
    return local


@dataclass(frozen=True)
class EvalReport:
    version: VersionInfo
    metrics: dict[str, float]
    base_metrics: dict[str, float]


def evaluate(
    registry: Registry,
    name: str,
    version: int,
    *,
    spec: EvaluateSpec | None = None,
    data: str | None = None,
    with_base: bool = True,
) -> EvalReport:
    """Score a version (and its base, for ``better_than_base``) and record both on the version."""
    from training.data import load_rows
    from training.evaluation import evaluate_model
    from training.models import load_adapted_model, load_tokenizer

    spec = spec or EvaluateSpec()
    info = registry.get_version(name, version)
    source = data or info.tags.get(lineage.DATA_EVAL)
    if not source:
        raise ForgelineError(f"{name} v{version} records no eval data; fix: pass --data FILE", code=ErrorCode.INVALID_REQUEST)
    rows = load_rows(source)
    adapter = download_artifacts(info.source, "adapter", name, version)
    model_spec = ModelSpec(base=info.tags[lineage.BASE_MODEL])
    tokenizer = load_tokenizer(model_spec, source=str(adapter))
    model = load_adapted_model(model_spec, adapter)
    metrics = evaluate_model(model, tokenizer, rows, spec)
    base_metrics: dict[str, float] = {}
    if with_base:
        with model.disable_adapter():
            base_metrics = evaluate_model(model, tokenizer, rows, spec)
    registry.record_evaluation(name, version, metrics, base_metrics=base_metrics or None)
    _log_metrics_on_run(info.run_id, metrics, base_metrics)
    return EvalReport(registry.get_version(name, version), metrics, base_metrics)


def _log_metrics_on_run(run_id: str | None, metrics: dict[str, float], base: dict[str, float]) -> None:
    """Evaluation results also go on the training run, so MLflow's UI compares runs."""
    if not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, f"final_{key}", value)
    for key, value in base.items():
        client.log_metric(run_id, f"base_{key}", value)


def check(registry: Registry, name: str, version: int, policy: PromotionPolicy, alias: str | None = None) -> PolicyResult:
    """Dry run of the promotion gates (moves nothing)."""
    info = registry.get_version(name, version)
    return check_policy(policy, info, holder=registry.alias_holder(name, alias or policy.to))


def promote_version(
    registry: Registry, name: str, version: int, policy: PromotionPolicy, *, alias: str | None, actor: str, reason: str
) -> PolicyResult:
    """Move ``alias`` to the version if every gate passes; raises ``PolicyRefused`` otherwise."""
    result, _ = promote(registry, name, version, policy=policy, alias=alias, actor=actor, reason=reason)
    return result


@dataclass(frozen=True)
class BuiltEngine:
    version: VersionInfo
    path: Path
    artifact_uri: str


def build(registry: Registry, ref: str, *, target: str = "torch") -> BuiltEngine:
    """Build the serving artifact of a version and log it on the version's run.

    Target ``torch``: the adapter merged into the base (safetensors + tokenizer +
    generation config + checksummed manifest).
    """
    import mlflow

    from serving.build.torch_build import build_torch_artifact

    if target != "torch":
        raise ForgelineError(f"unknown build target {target!r}; fix: use `torch`", code=ErrorCode.INVALID_REQUEST, param="target")
    info = registry.resolve(ref)
    adapter = download_artifacts(info.source, "adapter", info.name, info.version)
    out = forgeline_home() / "engines" / info.name / str(info.version) / target
    build_torch_artifact(info.tags[lineage.BASE_MODEL], adapter, out)
    artifact_uri = str(out)
    if info.run_id:
        client = mlflow.MlflowClient()
        client.log_artifacts(info.run_id, str(out), artifact_path=f"engine/{target}")
        artifact_uri = f"{client.get_run(info.run_id).info.artifact_uri}/engine/{target}"
    registry.set_tags(info.name, info.version, {f"{lineage.ENGINE_PREFIX}{target}": artifact_uri})
    log.info("built %s engine for %s v%s at %s", target, info.name, info.version, out)
    return BuiltEngine(registry.get_version(info.name, info.version), out, artifact_uri)
