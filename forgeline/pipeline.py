"""The stages a recipe goes through, each usable on its own and chained by ``quickstart``.

Only this package knows training, registry and serving together; each stage is a plain
function over the registry so the CLI, the control plane and tests share one code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ConfigError, ErrorCode, ForgelineError
from registry.eval_samples import record_samples, record_suite_samples
from registry.gates import PolicyResult
from registry.policy import PromotionPolicy
from registry.promotion import check as check_gates
from registry.promotion import promote
from registry.runs import download_artifact_uri
from registry.settings import forgeline_home, tracking_uri
from training.config import EvaluateSpec, GRPOMethod, ModelSpec
from training.job import TrainJob, TrainResult
from training.runner import ForegroundRunner

from .comparison import attach_report
from .recipe import Recipe, recipe_hash
from .versions import VersionWeights, version_weights

if TYPE_CHECKING:
    from jobs.base import JobSpec
    from jobs.config import ClusterSpec
    from serving.artifacts.trtllm_build import TrtllmBuildOptions

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
    return ForegroundRunner().run(job_from_recipe(recipe, recipe_file), registry=registry)


def download_artifacts(uri: str, kind: str, name: str, version: int) -> Path:
    """A local copy of a version's artifact folder (a no-op copy on the embedded store)."""
    dst = forgeline_home() / "cache" / name / str(version) / kind
    if (dst / ".complete").exists():
        return dst / Path(uri.rstrip("/")).name
    dst.mkdir(parents=True, exist_ok=True)
    local = download_artifact_uri(uri, dst, tracking_uri=tracking_uri())
    (dst / ".complete").touch()
    return local


@dataclass(frozen=True)
class EvalReport:
    version: VersionInfo
    metrics: dict[str, float]
    base_metrics: dict[str, float]


def local_weights(info: VersionInfo) -> VersionWeights:
    """The version's weights copied here, and whether they are an adapter or a whole model."""
    folder = download_artifacts(info.source, "adapter", info.name, info.version)
    return version_weights(info, folder)


def recorded_grpo_method(registry: Registry, info: VersionInfo) -> tuple[GRPOMethod, Path | None]:
    """The GRPO ``method`` section (rewards and all) the version was trained with, from its run.

    Training logs the resolved recipe as ``recipe/resolved.json`` on the run; its
    ``recipe_file`` folder is where user reward modules are imported from.

    Raises:
        ForgelineError: the version has no run, or the run has no readable recipe.
    """
    import json
    import tempfile

    fix = "fix: pass the recipe (`forgeline evaluate NAME VERSION --recipe RECIPE.yaml`)"
    if not info.run_id:
        raise ForgelineError(f"{info.ref} is a GRPO version without a training run to read its rewards from; {fix}",
                             code=ErrorCode.INVALID_REQUEST, param="recipe")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = registry.download_run_artifact(info.run_id, "recipe/resolved.json", tmp)
            resolved = json.loads(Path(path).read_text())
            method = GRPOMethod.model_validate(resolved["method"])
        except (ForgelineError, OSError, KeyError, ValueError) as err:  # no such artifact, or a run from another tool
            raise ForgelineError(f"{info.ref}: cannot read the GRPO rewards from run {info.run_id} ({err}); {fix}",
                                 code=ErrorCode.INVALID_REQUEST, param="recipe") from err
    recipe_file = resolved.get("recipe_file")
    return method, Path(recipe_file).parent if recipe_file else None


def recorded_suites(registry: Registry, info: VersionInfo) -> list[str]:
    """The ``evaluate.suites`` of the recipe the version was trained with (none when unreadable)."""
    import json
    import tempfile

    if not info.run_id:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = registry.download_run_artifact(info.run_id, "recipe/resolved.json", tmp)
            suites = json.loads(path.read_text()).get("evaluate", {}).get("suites", [])
        except (ForgelineError, OSError, ValueError, AttributeError):
            return []
    return [s for s in suites if isinstance(s, str)]


def evaluate(
    registry: Registry,
    name: str,
    version: int,
    *,
    spec: EvaluateSpec | None = None,
    data: str | None = None,
    with_base: bool = True,
    method: GRPOMethod | None = None,
    search_path: Path | None = None,
) -> EvalReport:
    """Score a version (and its base, for ``better_than_base``) and record both on the version.

    SFT and DPO versions are scored by exact match of greedy answers and completion loss;
    GRPO versions by the rewards they were trained with (mean reward per function, pass@1
    and pass@k of verifiable answers; see `training.reward_evaluation`). ``method``
    overrides the GRPO section recorded on the training run. Adapters are scored with the
    adapter on and off; a full fine-tune against its base checkpoint, loaded in turn.

    Then the suites (``spec.suites``, else the training recipe's ``evaluate.suites``; see
    `training.suites`) score the same weights: their metrics join the version's, their
    per-item scores the table significance-aware gates read, their per-sample rows a table
    each on the run; and a comparison report against base and production goes on the run.
    """
    from training.data import load_rows
    from training.evaluation import ItemScores, evaluate_items
    from training.models import load_adapted_model, load_base_model, load_tokenizer
    from training.reward_evaluation import evaluate_rewards
    from training.suites.result import SuiteResult, aligned, combine
    from training.suites.runner import run_suites
    from training.suites.spec import load_suites
    from training.tool_call_scoring import score_tool_use

    spec = spec or EvaluateSpec()
    info = registry.get_version(name, version)
    source = data or info.tags.get(lineage.DATA_EVAL)
    if not source:
        raise ForgelineError(f"{name} v{version} records no eval data; fix: pass --data FILE", code=ErrorCode.INVALID_REQUEST)
    if method is None and info.tags.get(lineage.METHOD) == "grpo":
        method, search_path = recorded_grpo_method(registry, info)
    if method is not None:
        from training.rewards import check_rewards

        # Before any weights load: a reward module that moved since training is one clear error.
        problems = check_rewards(method.rewards, search_path)
        if problems:
            raise ConfigError(problems=problems, source=f"the rewards of {info.ref}")
    suites = load_suites(spec.suites or recorded_suites(registry, info))  # bad suite files fail before weights load
    rows = load_rows(source)
    weights = local_weights(info)
    tokenizer = load_tokenizer(ModelSpec(base=weights.base_model), source=str(weights.path))

    Scored = tuple[dict[str, float], ItemScores | None, list[SuiteResult]]
    parse_calls = tool_call_parser(tokenizer, rows, source)

    def score(model: Any, *, base: bool) -> Scored:
        if method is not None:
            metrics, items = evaluate_rewards(model, tokenizer, rows, spec, method, search_path=search_path), None
        else:
            metrics, items = evaluate_items(model, tokenizer, rows, spec)
            if parse_calls is not None:  # tool-use rows: call accuracy, schema validity, final answers
                tool_metrics, tool_scores = score_tool_use(
                    model, tokenizer, rows, parse=parse_calls, max_new_tokens=spec.max_new_tokens,
                    batch_size=spec.batch_size, max_samples=spec.max_samples,
                )
                metrics = {**metrics, **tool_metrics}
                items = items or tool_scores
        results = run_suites(suites, model, tokenizer, model_name=name, base=base)
        for result in results:
            metrics = {**metrics, **result.metrics}
        return metrics, items, results

    base_metrics: dict[str, float] = {}
    base_items: ItemScores | None = None
    base_results: list[SuiteResult] = []
    if weights.is_adapter:
        model = load_adapted_model(ModelSpec(base=weights.base_model), weights.path)
        metrics, items, results = score(model, base=False)
        if with_base:
            with model.disable_adapter():
                base_metrics, base_items, base_results = score(model, base=True)
    else:
        # One model in memory at a time: the fine-tune, then the base it started from.
        metrics, items, results = score(load_base_model(ModelSpec(base=str(weights.path))), base=False)
        if with_base:
            base_metrics, base_items, base_results = score(load_base_model(ModelSpec(base=weights.base_model)), base=True)
    if not metrics:
        kind = "prompt rows with the fields its rewards read" if method else "rows with an expected answer"
        raise ForgelineError(f"{source} has no {kind} to evaluate {name} v{version} on; fix: pass --data FILE with such rows",
                             code=ErrorCode.INVALID_REQUEST, param="data")
    registry.record_evaluation(name, version, metrics, base_metrics=base_metrics or None)
    _log_metrics_on_run(registry, info.run_id, metrics, base_metrics)
    if info.run_id or info.tags.get(lineage.RUN_ID):
        # Per-item scores, for gates that decide on confidence intervals (registry.significance).
        ids, columns = combine((items.items, items.scores) if items else None, results)
        base_ids, base_columns = combine((base_items.items, base_items.scores) if base_items else None, base_results)
        current = registry.get_version(name, version)
        if ids:
            record_samples(registry, current, ids, columns, aligned(ids, base_ids, base_columns) if base_ids else None)
        for result, is_base in [(r, False) for r in results] + [(r, True) for r in base_results]:
            record_suite_samples(registry, current, result.suite, result.samples, base=is_base)
        if suites:
            registry.set_tags(name, version, {lineage.EVAL_SUITES: ",".join(s.name for s in suites)})
        attach_report(registry, registry.get_version(name, version))
    return EvalReport(registry.get_version(name, version), metrics, base_metrics)


def tool_call_parser(tokenizer: Any, rows: list[dict[str, Any]], source: str) -> Any:
    """How to read tool calls out of this model's answers, when ``rows`` have tools (else None).

    The format is the one the chat template teaches (`serving.engine.tool_formats`), the same
    parser the gateway uses, so a call scores here as the gateway would return it.

    Raises:
        ForgelineError: the rows have tools but the template writes no tool-call format we know.
    """
    from serving.engine.tool_formats import FORMATS, detect_tool_format
    from training.tool_call_scoring import has_tool_rows

    if not has_tool_rows(rows):
        return None
    fmt = detect_tool_format(getattr(tokenizer, "chat_template", None))
    if fmt is None:
        raise ForgelineError(
            f"{source} has tool-use rows, but the model's chat template renders no tool calls in a known format "
            f"({', '.join(FORMATS)}); fix: train with `model.chat_template` set to one that does "
            "(e.g. recipes/templates/tiny-tools.jinja)",
            code=ErrorCode.INVALID_REQUEST, param="data",
        )

    def parse(text: str) -> tuple[str | None, list[tuple[str, str]]]:
        content, calls = fmt.parse(text)
        return content, [(c.name, c.arguments) for c in calls]

    return parse


def _log_metrics_on_run(registry: Registry, run_id: str | None, metrics: dict[str, float], base: dict[str, float]) -> None:
    """Evaluation results also go on the training run, so MLflow's UI compares runs."""
    if not run_id:
        return
    # The registry's verbs, not MLflow's fluent API: a long-running process (the control
    # plane) never set MLflow's global tracking URI.
    registry.log_metrics(run_id, {f"final_{key}": value for key, value in metrics.items()})
    registry.log_metrics(run_id, {f"base_{key}": value for key, value in base.items()})


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
    pending: bool = False  # tensorrt-llm job prepared, not finished yet
    job: JobSpec | None = None  # the build job to submit, for a build on a cluster


def build(
    registry: Registry,
    ref: str,
    *,
    target: str = "torch",
    trtllm: TrtllmBuildOptions | None = None,
    runner: str = "local",
    extra_adapters: list[str] | None = None,
    finalize: bool = False,
    cluster: ClusterSpec | None = None,
) -> BuiltEngine:
    """Build the serving artifact of a version and log it on the version's run.

    Target ``torch``: the adapter merged into the base, or a full fine-tune's own weights
    (safetensors + tokenizer + generation config + checksummed manifest); on a cluster it is a
    job running this same function (`forgeline.stage_jobs.build_spec`). Target ``tensorrt-llm``:
    see `_build_trtllm` (``trtllm``, ``runner``, ``extra_adapters``, ``finalize`` and ``cluster`` apply to it).
    """

    from serving.artifacts.torch_build import build_torch_artifact

    if target == "tensorrt-llm":
        return _build_trtllm(registry, ref, trtllm, runner=runner, extra_adapters=extra_adapters or [], finalize=finalize,
                             cluster=cluster)
    if target != "torch":
        raise ForgelineError(
            f"unknown build target {target!r}; fix: use `torch` or `tensorrt-llm`", code=ErrorCode.INVALID_REQUEST, param="target"
        )
    info = registry.resolve(ref)
    weights = local_weights(info)
    out = forgeline_home() / "engines" / info.name / str(info.version) / target
    if weights.is_adapter:
        build_torch_artifact(weights.base_model, weights.path, out)
    else:
        build_torch_artifact(weights.base_model, None, out, full_weights=weights.path)
    artifact_uri = str(out)
    if info.run_id:
        artifact_uri = registry.upload_artifacts(info.run_id, out, f"engine/{target}")
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
    cluster: ClusterSpec | None = None,
) -> BuiltEngine:
    """Target ``tensorrt-llm``: prepare the artifact, run the build job in TensorRT-LLM's container.

    With ``runner="local"`` the job runs here (docker, podman or enroot) and the artifact is
    logged on the version (tag ``forgeline.engine.tensorrt-llm``). With a ``cluster`` the
    artifact is prepared and the build job to submit is returned (``BuiltEngine.job``, rendered
    from ``platform/`` templates by the ``jobs`` launchers); once it ends, ``finalize=True``
    checks its result and logs the artifact.
    """

    from serving.artifacts.trtllm_build import (
        TrtllmBuildOptions,
        build_trtllm_artifact,
        finalize_trtllm_job,
        load_job,
        trtllm_job_spec,
    )

    target = "tensorrt-llm"
    if runner not in ("local", "none"):
        raise ForgelineError(f"unknown runner {runner!r}; fix: use local or none, or --cluster FILE for Slurm or Kubernetes",
                             code=ErrorCode.INVALID_REQUEST, param="runner")
    info = registry.resolve(ref)
    out = forgeline_home() / "engines" / info.name / str(info.version) / target
    if finalize:
        manifest = finalize_trtllm_job(load_job(out))
    else:
        weights = local_weights(info)
        base = weights.base_model
        adapter = weights.path if weights.is_adapter else None
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
            other_weights = local_weights(other)
            if not other_weights.is_adapter:
                raise ForgelineError(
                    f"{other.ref} is a full fine-tune, not an adapter; fix: build it as its own engine",
                    code=ErrorCode.INVALID_REQUEST,
                    param="adapter",
                )
            extras[f"{other.name}-v{other.version}"] = other_weights.path
        _, manifest = build_trtllm_artifact(
            base,
            adapter,
            out,
            options or TrtllmBuildOptions(),
            name=f"{info.name}-v{info.version}",
            runner="none" if cluster is not None else runner,  # type: ignore[arg-type]
            model=info.name,
            adapter_name=f"{info.name}-v{info.version}",
            extra_adapters=extras,
            overwrite=True,
            full_weights=None if weights.is_adapter else weights.path,
        )
    if manifest is None:
        spec = trtllm_job_spec(load_job(out), cluster, name=info.name) if cluster is not None and not finalize else None
        return BuiltEngine(info, out, "", pending=True, job=spec)
    artifact_uri = str(out)
    if info.run_id:
        artifact_uri = registry.upload_artifacts(info.run_id, out, f"engine/{target}")
    registry.set_tags(info.name, info.version, {lineage.engine_tag(target): artifact_uri})
    log.info("built %s engine for %s v%s at %s", target, info.name, info.version, out)
    return BuiltEngine(registry.get_version(info.name, info.version), out, artifact_uri)
