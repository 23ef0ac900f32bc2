"""The stages a recipe goes through, each usable on its own and chained by ``quickstart``.

Only this package knows training, registry and serving together; each stage is a plain
function over the registry so the CLI, the control plane and tests share one code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError
from registry.policy import PromotionPolicy
from registry.promotion import PolicyResult, promote
from registry.promotion import check as check_gates
from registry.settings import forgeline_home, tracking_uri
from training.config import EvaluateSpec, ModelSpec
from training.job import TrainJob, TrainResult
from training.launch import LocalLauncher

from .recipe import Recipe, recipe_hash

if TYPE_CHECKING:
    from serving.build.trtllm_build import TrtllmBuildOptions

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
        distributed=recipe.distributed,
        evaluate=recipe.evaluate,
        recipe_hash=recipe_hash(recipe),
        recipe_file=str(Path(recipe_file).resolve()) if recipe_file else None,
    )


def train(recipe: Recipe, recipe_file: str | Path | None, *, registry: Registry) -> TrainResult:
    """Train and register one version (stages: train, track, register).

    One process runs here; ``distributed.nproc > 1`` runs under ``torchrun`` on this machine.
    An interrupted run of the same recipe resumes from its last complete checkpoint.
    """
    return LocalLauncher().run(job_from_recipe(recipe, recipe_file), registry=registry)


def download_artifacts(uri: str, kind: str, name: str, version: int) -> Path:
    """A local copy of a version's artifact folder (a no-op copy on the embedded store)."""
    import mlflow

    dst = forgeline_home() / "cache" / name / str(version) / kind
    if (dst / ".complete").exists():
        return dst / Path(uri.rstrip("/")).name
    dst.mkdir(parents=True, exist_ok=True)
    # Explicit tracking URI: `mlflow-artifacts:` URIs resolve through it, and long-running callers never set it globally.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri()))
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
    _log_metrics_on_run(registry, info.run_id, metrics, base_metrics)
    return EvalReport(registry.get_version(name, version), metrics, base_metrics)


def _log_metrics_on_run(registry: Registry, run_id: str | None, metrics: dict[str, float], base: dict[str, float]) -> None:
    """Evaluation results also go on the training run, so MLflow's UI compares runs."""
    if not run_id:
        return
    # The registry's client, not a default MlflowClient(): a long-running process (the control
    # plane) never set MLflow's global tracking URI.
    for key, value in metrics.items():
        registry.client.log_metric(run_id, f"final_{key}", value)
    for key, value in base.items():
        registry.client.log_metric(run_id, f"base_{key}", value)


def check(registry: Registry, name: str, version: int, policy: PromotionPolicy, alias: str | None = None) -> PolicyResult:
    """Dry run of every promotion gate, approvals and per-alias requirements included (moves nothing)."""
    return check_gates(registry, name, version, policy, alias=alias)


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
    pending: bool = False  # tensorrt-llm job submitted or prepared, not finished yet


def build(
    registry: Registry,
    ref: str,
    *,
    target: str = "torch",
    trtllm: TrtllmBuildOptions | None = None,
    runner: str = "local",
    extra_adapters: list[str] | None = None,
    finalize: bool = False,
) -> BuiltEngine:
    """Build the serving artifact of a version and log it on the version's run.

    Target ``torch``: the adapter merged into the base (safetensors + tokenizer +
    generation config + checksummed manifest). Target ``tensorrt-llm``: see
    `_build_trtllm` (``trtllm``, ``runner``, ``extra_adapters`` and ``finalize`` apply to it).
    """

    from serving.build.torch_build import build_torch_artifact

    if target == "tensorrt-llm":
        return _build_trtllm(registry, ref, trtllm, runner=runner, extra_adapters=extra_adapters or [], finalize=finalize)
    if target != "torch":
        raise ForgelineError(
            f"unknown build target {target!r}; fix: use `torch` or `tensorrt-llm`", code=ErrorCode.INVALID_REQUEST, param="target"
        )
    info = registry.resolve(ref)
    adapter = download_artifacts(info.source, "adapter", info.name, info.version)
    out = forgeline_home() / "engines" / info.name / str(info.version) / target
    build_torch_artifact(info.tags[lineage.BASE_MODEL], adapter, out)
    artifact_uri = str(out)
    if info.run_id:
        client = registry.client
        client.log_artifacts(info.run_id, str(out), artifact_path=f"engine/{target}")
        artifact_uri = f"{client.get_run(info.run_id).info.artifact_uri}/engine/{target}"
    registry.set_tags(info.name, info.version, {f"{lineage.ENGINE_PREFIX}{target}": artifact_uri})
    log.info("built %s engine for %s v%s at %s", target, info.name, info.version, out)
    return BuiltEngine(registry.get_version(info.name, info.version), out, artifact_uri)


def _build_trtllm(
    registry: Registry,
    ref: str,
    options: TrtllmBuildOptions | None,
    *,
    runner: str,
    extra_adapters: list[str],
    finalize: bool,
) -> BuiltEngine:
    """Target ``tensorrt-llm``: prepare the artifact, run the build job in TensorRT-LLM's container.

    With ``runner="local"`` the job runs here (docker, podman or enroot) and the artifact is
    logged on the version (tag ``forgeline.engine.tensorrt-llm``). Slurm and Kubernetes jobs
    are submitted; once they end, ``finalize=True`` checks their result and logs the artifact.
    """

    from serving.build.trtllm_build import TrtllmBuildOptions, build_trtllm_artifact, finalize_trtllm_job, load_job

    target = "tensorrt-llm"
    if runner not in ("local", "slurm", "kubernetes", "none"):
        raise ForgelineError(f"unknown runner {runner!r}; fix: use local, slurm, kubernetes or none", code=ErrorCode.INVALID_REQUEST, param="runner")
    info = registry.resolve(ref)
    out = forgeline_home() / "engines" / info.name / str(info.version) / target
    if finalize:
        manifest = finalize_trtllm_job(load_job(out))
    else:
        base = info.tags[lineage.BASE_MODEL]
        adapter = download_artifacts(info.source, "adapter", info.name, info.version)
        extras: dict[str, Path] = {}
        for extra_ref in extra_adapters:
            other = registry.resolve(extra_ref)
            if other.tags.get(lineage.BASE_MODEL) != base:
                raise ForgelineError(
                    f"{other.name} v{other.version} was trained from {other.tags.get(lineage.BASE_MODEL)}, not {base}; "
                    "multi-LoRA adapters must share the base",
                    code=ErrorCode.INVALID_REQUEST,
                    param="adapter",
                )
            extras[f"{other.name}-v{other.version}"] = download_artifacts(other.source, "adapter", other.name, other.version)
        _, manifest = build_trtllm_artifact(
            base,
            adapter,
            out,
            options or TrtllmBuildOptions(),
            name=f"{info.name}-v{info.version}",
            runner=runner,  # type: ignore[arg-type]
            adapter_name=f"{info.name}-v{info.version}",
            extra_adapters=extras,
            overwrite=True,
        )
    if manifest is None:
        return BuiltEngine(info, out, "", pending=True)
    artifact_uri = str(out)
    if info.run_id:
        client = registry.client
        client.log_artifacts(info.run_id, str(out), artifact_path=f"engine/{target}")
        artifact_uri = f"{client.get_run(info.run_id).info.artifact_uri}/engine/{target}"
    registry.set_tags(info.name, info.version, {lineage.engine_tag(target): artifact_uri})
    log.info("built %s engine for %s v%s at %s", target, info.name, info.version, out)
    return BuiltEngine(registry.get_version(info.name, info.version), out, artifact_uri)
