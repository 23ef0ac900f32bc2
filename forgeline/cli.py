"""The ``forgeline`` command line.

Every command prints one clear line per error (no traceback unless ``--debug``) and exits
2 for invalid input (a broken recipe), 1 for a refused or failed operation.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from registry import lineage
from registry.errors import ErrorCode, ForgelineError

from .cli_bases import bases_app
from .cli_db import db_app
from .cli_govern import approve_app, control_app, reconcile_app
from .cli_identity import LocalAdminOpt, local_actor
from .cli_jobs import jobs_app
from .cli_keys import keys_app
from .cli_limits import BodyTimeout, GracefulShutdown, HeaderTimeout, KeepAlive, MaxConnections, server_limits
from .cli_shared import console, err_console, handles_errors, open_registry, print_error, state
from .cli_worker import worker as _worker_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recipe in; governed OpenAI-compatible endpoint out.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models, versions and alias history.")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
app.add_typer(control_app, name="control")
app.add_typer(approve_app)  # `forgeline approve`
models_app.add_typer(bases_app)  # `forgeline models add-base | bases | remove-base`
models_app.add_typer(reconcile_app)  # `forgeline models reconcile`
ClusterOpt = Annotated[
    Path | None,
    typer.Option("--cluster", help="Run this as a job where a cluster file says (the recipe's `cluster` fields as YAML, "
                 "e.g. `kind: slurm`); follow it with `forgeline jobs`."),
]
DetachOpt = Annotated[bool, typer.Option("--detach", help="With --cluster: return once submitted.")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")]


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@handles_errors
def validate(
    recipe: RecipeArg,
    schema: Annotated[bool, typer.Option("--schema", help="Print the recipe JSON schema instead.")] = False,
) -> None:
    """Check a recipe; report every problem with its YAML path, value and fix (exit 2)."""
    from .recipe import Recipe, load_recipe, recipe_warnings

    if schema:
        console.print_json(json.dumps(Recipe.model_json_schema()))
        return
    loaded = load_recipe(recipe)
    for warning in recipe_warnings(loaded):
        err_console.print(f"[bold yellow]warning:[/] {escape(str(warning))}", highlight=False, soft_wrap=True)
    console.print(f"[green]ok[/] {recipe}: {loaded.method.kind} ({loaded.adapter.kind}) of {loaded.model.base} → {loaded.name}")


@app.command()
@handles_errors
def train(
    recipe: RecipeArg,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Where to train: local, slurm, kubernetes or hostfile (overrides cluster.kind).")] = None,
    nodes: Annotated[int | None, typer.Option(help="Override cluster.nodes.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="Override cluster.gpus_per_node (0: CPU-only nodes).")] = None,
    partition: Annotated[str | None, typer.Option(help="Override cluster.partition (Slurm).")] = None,
    time_limit: Annotated[str | None, typer.Option(help="Override cluster.time_limit, e.g. 4:00:00.")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once submitted; follow with `forgeline jobs`.")] = False,
) -> None:
    """Train, track and register one version from a recipe: here, or as a job on a cluster."""
    from . import pipeline
    from .recipe import load_recipe

    loaded = load_recipe(recipe)
    if detach or loaded.cluster.kind != "local" or any(v is not None for v in (cluster, nodes, gpus_per_node, partition, time_limit)):
        from .cli_jobs import cluster_with_overrides, train_on_cluster

        spec = cluster_with_overrides(loaded, str(recipe), kind=cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                                      partition=partition, time_limit=time_limit)
        if detach or spec.kind != "local":
            train_on_cluster(loaded, recipe, spec, detach=detach)
            return
    result = pipeline.train(loaded, recipe, registry=open_registry())
    if result.resumed_from_step:
        console.print(f"resumed from step {result.resumed_from_step} of an interrupted run")
    console.print(f"registered [bold]{result.version.name}[/] version {result.version.version} (run {result.run_id})")
    console.print(f"model folder: {result.adapter_dir}", highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def evaluate(
    name: str,
    version: int,
    data: Annotated[str | None, typer.Option(help="Eval data file; default: the one recorded on the version.")] = None,
    max_samples: Annotated[int, typer.Option(help="Evaluate at most this many rows.")] = 200,
    samples: Annotated[int, typer.Option(help="GRPO versions: completions sampled per prompt.")] = 8,
    pass_k: Annotated[int, typer.Option(help="GRPO versions: report pass@k for this k (and pass@1).")] = 4,
    recipe: Annotated[
        Path | None, typer.Option(help="GRPO versions: take the rewards from this recipe, not the training run's.")
    ] = None,
    cluster: ClusterOpt = None,
    detach: DetachOpt = False,
    suite: Annotated[
        list[str] | None,
        typer.Option(help="Suite file to score too (repeatable), e.g. recipes/suites/general.yaml; "
                     "default: the training recipe's evaluate.suites."),
    ] = None,
) -> None:
    """Score a version and its base on held-out data; record the metrics on the version.

    Suites (general capability through lm-evaluation-harness, an LLM judge against the
    production holder, safety) add their metrics, per-item scores and a comparison report.

    SFT/DPO versions: exact-match accuracy and eval loss. GRPO versions: the recipe's rewards
    (mean per function) and pass@1 / pass@k of verifiable answers. Full fine-tunes are
    compared with the base checkpoint they were trained from. With --cluster FILE the same
    command runs as a job there (`forgeline jobs`), and the model loads there, not here.
    """
    from training.config import EvaluateSpec, GRPOMethod

    from . import pipeline
    from .recipe import load_recipe

    method, search_path = None, None
    if recipe is not None:
        loaded = load_recipe(recipe)
        if not isinstance(loaded.method, GRPOMethod):
            raise typer.BadParameter(f"{recipe} is a {loaded.method.kind} recipe; --recipe is for GRPO versions", param_hint="--recipe")
        method, search_path = loaded.method, recipe.resolve().parent
    if not 0 < pass_k <= samples:
        raise typer.BadParameter(f"{pass_k} is not in 1..--samples ({samples}); fix: raise --samples or lower --pass-k",
                                 param_hint="--pass-k")
    if cluster is not None:
        options = ["--max-samples", str(max_samples), "--samples", str(samples), "--pass-k", str(pass_k)]
        options += ["--data", str(Path(data).resolve()) if Path(data).exists() else data] if data else []
        options += ["--recipe", str(recipe.resolve())] if recipe else []
        options += [o for s in suite or [] for o in ("--suite", str(Path(s).resolve()))]
        _evaluate_on_cluster(name, version, cluster, options, detach=detach)
        return
    spec = EvaluateSpec(max_samples=max_samples, samples=samples, pass_k=pass_k, suites=[str(Path(s).resolve()) for s in suite or []])
    report = pipeline.evaluate(open_registry(), name, version, spec=spec, data=data, method=method, search_path=search_path)
    _print_metrics(report.metrics, report.base_metrics)


def _evaluate_on_cluster(name: str, version: int, cluster_file: Path, options: list[str], *, detach: bool) -> None:
    from .cli_jobs import load_cluster_file, run_as_job
    from .stage_jobs import evaluate_spec

    run_as_job(evaluate_spec(name, version, load_cluster_file(cluster_file), options=options), detach=detach)
    if not detach:
        info = open_registry().get_version(name, version)
        _print_metrics(info.metrics(), info.base_metrics())


def _print_metrics(metrics: dict[str, float], base: dict[str, float]) -> None:
    table = Table("metric", "version", "base")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}", f"{base[key]:.4f}" if key in base else "-")
    console.print(table)


def _policy(recipe: Path | None, policy_file: Path | None) -> Any:
    import yaml

    from registry.policy import PromotionPolicy

    from .recipe import load_recipe, parse_recipe_section

    if recipe:
        return load_recipe(recipe).promote
    if policy_file:
        return parse_recipe_section(PromotionPolicy, yaml.safe_load(policy_file.read_text()) or {}, source=str(policy_file))
    return PromotionPolicy()


@app.command()
@handles_errors
def promote(
    name: str,
    version: int,
    to: Annotated[str, typer.Option("--to", help="Alias to move, e.g. production.")] = "production",
    recipe: Annotated[Path | None, typer.Option(help="Take the policy from this recipe's `promote` section.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Take the policy from a YAML policy file.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    local_admin: LocalAdminOpt = None,
) -> None:
    """Move an alias to a version if every gate of the policy passes (all-or-nothing).

    Acts on the local databases as the explicit local admin --local-admin NAME (audited as
    `local-admin:NAME`); teams promote through the control plane with a key.
    """
    from registry.errors import PolicyRefused
    from registry.promotion import check as check_gates

    from . import pipeline

    actor = local_actor(local_admin, "promote")
    registry = open_registry()
    pol = _policy(recipe, policy)
    result = check_gates(registry, name, version, pol, alias=to)  # approvals and per-alias requirements too
    _print_gates(result)
    if not result.passed:
        raise PolicyRefused(f"promotion of {name} v{version} to {to} refused: {result.reason()}")
    pipeline.promote_version(registry, name, version, pol, alias=to, actor=actor, reason=reason or "forgeline promote")
    console.print(f"[green]{name}@{to}[/] → version {version}")


def _print_gates(result: Any) -> None:
    for gate in result.gates:
        mark = "[green]pass[/]" if gate.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {gate.name}: {gate.detail}", highlight=False)


@app.command()
@handles_errors
def rollback(
    name: str,
    alias: Annotated[str, typer.Option("--alias", help="Alias to roll back.")] = "production",
    to: Annotated[int | None, typer.Option("--to", help="Version to return to; default: the previous holder.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    local_admin: LocalAdminOpt = None,
) -> None:
    """Point an alias back at an earlier version (recorded in the audit log).

    Acts on the local databases as the explicit local admin --local-admin NAME (audited as
    `local-admin:NAME`).
    """
    from registry.promotion import rollback as do_rollback

    actor = local_actor(local_admin, "rollback")
    entry = do_rollback(open_registry(), name, alias=alias, to_version=to, actor=actor, reason=reason or "forgeline rollback")
    console.print(f"{name}@{alias}: {entry.from_version} → {entry.to_version}")


@app.command()
@handles_errors
def build(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME@VERSION.")],
    target: Annotated[str, typer.Option(help="Engine target: torch or tensorrt-llm.")] = "torch",
    quantize: Annotated[str, typer.Option(help="tensorrt-llm: none or fp8 (ModelOpt).")] = "none",
    tp: Annotated[int, typer.Option("--tp", help="tensorrt-llm: tensor-parallel GPUs (1, 2, 4, 8).")] = 1,
    backend: Annotated[str, typer.Option(help="tensorrt-llm: pytorch, or tensorrt for a serialized engine.")] = "pytorch",
    multi_lora: Annotated[bool, typer.Option("--multi-lora", help="tensorrt-llm: keep adapters separate (per-request LoRA).")] = False,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="tensorrt-llm, multi-LoRA: add another version's adapter (repeatable).")] = None,
    runner: Annotated[str, typer.Option(help="tensorrt-llm: local (container runtime) or none (prepare only); "
                                        "slurm: the same as --cluster with `kind: slurm`.")] = "local",
    finalize: Annotated[bool, typer.Option("--finalize", help="tensorrt-llm: record a build job that ended (after --detach).")] = False,
    cluster: ClusterOpt = None,
    detach: DetachOpt = False,
) -> None:
    """Build a version's serving artifact and log it on the version.

    With --cluster FILE the build runs as a job there (`forgeline jobs`): the torch build as
    `forgeline build` on a node, the TensorRT-LLM build in its container (Slurm with pyxis, a
    Kubernetes Job), prepared here first and recorded here when it ends.
    """
    from . import pipeline

    trtllm = None
    if target == "tensorrt-llm":
        from serving.artifacts.trtllm_build import build_options

        trtllm = build_options(quantize=quantize, tp=tp, backend=backend, multi_lora=multi_lora or bool(adapter))
    spec = None
    if cluster is not None:
        from .cli_jobs import load_cluster_file

        spec = load_cluster_file(cluster)
    elif runner == "slurm" and target == "tensorrt-llm":
        from jobs.config import ClusterSpec

        spec, runner = ClusterSpec(kind="slurm"), "local"
    if spec is not None and not finalize:
        _build_on_cluster(ref, target, trtllm, spec, adapter or [], detach=detach)
        return
    built = pipeline.build(open_registry(), ref, target=target, trtllm=trtllm, runner=runner, extra_adapters=adapter or [], finalize=finalize)
    if built.pending:
        console.print(f"{target} build job for {built.version.name} v{built.version.version} is ready ({runner}): {built.path}/job")
        return
    console.print(f"built {target} engine for {built.version.name} v{built.version.version}: {built.path}")


def _build_on_cluster(ref: str, target: str, trtllm: Any, cluster: Any, extra_adapters: list[str], *, detach: bool) -> None:
    from . import pipeline
    from .cli_jobs import run_as_job
    from .stage_jobs import build_spec

    registry = open_registry()
    info = registry.resolve(ref)
    if target == "tensorrt-llm":
        prepared = pipeline.build(registry, ref, target=target, trtllm=trtllm, extra_adapters=extra_adapters, cluster=cluster)
        assert prepared.job is not None
        run_as_job(prepared.job, detach=detach)
        if detach:
            console.print(f"when it ends: forgeline build {info.name}@{info.version} --target tensorrt-llm --finalize")
            return
        pipeline.build(registry, f"{info.name}@{info.version}", target=target, finalize=True)
    else:
        if target != "torch":
            raise typer.BadParameter(f"unknown build target {target!r}; fix: use torch or tensorrt-llm", param_hint="--target")
        run_as_job(build_spec(info.name, info.version, cluster), detach=detach)
        if detach:
            return
    from registry.lineage import engine_tag

    artifact = registry.get_version(info.name, info.version).tags.get(engine_tag(target), "-")
    console.print(f"built {target} engine for {info.name} v{info.version}: {artifact}", highlight=False)


@app.command()
@handles_errors
def serve(
    model: Annotated[list[str] | None, typer.Option("--model", help="Model ref to serve, e.g. quickstart@production (repeatable).")] = None,
    base: Annotated[list[str] | None, typer.Option("--base", help="Operator base model to serve bare (`forgeline models add-base`); fine-tuned LoRA versions on it answer by their own name (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A gateway config file (models, pools, limits, keys, quotas, telemetry); see platform/gateway.yaml.")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1, or the config's).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8000, or the config's).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Gateway processes sharing the port (quotas then need Redis); default 1, or the config's.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="Weights' dtype: auto (float32 on CPUs; default, or the recipe's), float32, bfloat16 (about 2x faster on CPUs with AMX/AVX-512 BF16), float16.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Take the other serve options (canary, quotas, adapters) from this recipe's `serve` section.")] = None,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="Require API keys (`forgeline keys create`).")] = True,
    header_timeout: HeaderTimeout = None,
    body_timeout: BodyTimeout = None,
    keep_alive: KeepAlive = None,
    max_connections: MaxConnections = None,
    graceful_shutdown: GracefulShutdown = None,
) -> None:
    """Serve models through the OpenAI-compatible gateway until interrupted."""
    import os

    from serving.config import ServeSpec
    from serving.gateway.server import run_server
    from serving.service import configure_access_log

    from .recipe import load_recipe
    from .serve_app import FACTORY, PLAN_ENV, ServePlan, build_app, check_processes

    refs, base_names = list(model or []), list(dict.fromkeys(base or []))
    flags = {"header_timeout": header_timeout, "body_timeout": body_timeout, "keep_alive": keep_alive,
             "max_connections": max_connections, "graceful_shutdown": graceful_shutdown}
    if config is not None:
        from .gateway_config import load_gateway_config

        if refs or base_names or recipe:
            raise ForgelineError("--config names the models itself; drop --model, --base and --recipe",
                                 code=ErrorCode.INVALID_REQUEST, param="config")
        if dtype is not None:
            raise ForgelineError("--config sets the engine's dtype itself (`rollout.dtype`); drop --dtype",
                                 code=ErrorCode.INVALID_REQUEST, param="dtype")
        loaded = load_gateway_config(config)
        spec = loaded.serve_spec()
        limits = server_limits(spec.limits, **flags)
        spec = spec.model_copy(update={"host": host or spec.host, "port": port if port is not None else spec.port, "limits": limits})
        plan = ServePlan(spec=spec, config=str(config.resolve()))
        names = [m.name for m in loaded.models]
        workers = workers or loaded.server.workers
    else:
        if not refs and not base_names:
            raise ForgelineError(
                "nothing to serve: pass --model REF (a registry ref), --base NAME (see `forgeline models bases`) or --config FILE",
                code=ErrorCode.INVALID_REQUEST,
                param="model",
            )
        serve_spec = load_recipe(recipe).serve if recipe else ServeSpec()
        if dtype is not None:
            from serving.engine.loading import check_dtype

            serve_spec = serve_spec.model_copy(update={"dtype": check_dtype(dtype)})
        limits = server_limits(serve_spec.limits, **flags)
        spec = serve_spec.model_copy(update={"host": host or "127.0.0.1", "port": 8000 if port is None else port,
                                             "device": device, "auth": auth and serve_spec.auth, "limits": limits})
        plan = ServePlan(refs=refs, bases=base_names, spec=spec)
        names = refs + base_names
        workers = workers or 1
    check_processes(spec, workers)
    configure_access_log()
    try:
        where = f"http://{spec.host}:{spec.port}/v1 (API keys {'required' if spec.auth else 'OFF'})"
        if workers > 1:
            os.environ[PLAN_ENV] = plan.model_dump_json()
            console.print(f"serving {', '.join(names)} on {where} with {workers} processes")
            run_server(FACTORY, spec.host, spec.port, limits=spec.limits, workers=workers)
            return
        gateway = build_app(plan)
        console.print(f"serving {', '.join(names)} on {where}")
        run_server(gateway, spec.host, spec.port, limits=spec.limits)
    except ForgelineError as err:
        # Nothing could be served as asked: like bad input, exit 2 with one line.
        if state["debug"]:
            raise
        print_error(err, prefix="cannot serve: ")
        raise typer.Exit(2) from None


@app.command()
@handles_errors
def quickstart(
    recipe: Annotated[Path, typer.Argument(help="Recipe to run end to end.")] = Path("recipes/quickstart.yaml"),
    keep_serving: Annotated[bool, typer.Option(help="Keep the endpoint up after the demo call.")] = False,
) -> None:
    """Run a recipe end to end: validate, train, register, evaluate, promote, build, serve, call."""
    from .quickstart import run_quickstart

    run_quickstart(recipe, console=console, keep_serving=keep_serving)


@models_app.command("list")
@handles_errors
def models_list() -> None:
    """Registered models with their versions and aliases."""
    registry = open_registry()
    table = Table("model", "version", "aliases", "accuracy", "base")
    for name in registry.list_models():
        for info in registry.list_versions(name):
            m = info.metrics()
            table.add_row(name, str(info.version), ",".join(info.aliases), _fmt(m.get("accuracy")), info.tags.get(lineage.BASE_MODEL, ""))
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@models_app.command("show")
@handles_errors
def models_show(ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME@VERSION.")]) -> None:
    """One version with all its lineage tags."""
    info = open_registry().resolve(ref)
    console.print(f"[bold]{info.name}[/] version {info.version}  aliases: {', '.join(info.aliases) or '-'}")
    console.print(f"source: {info.source}")
    for key, value in sorted(info.tags.items()):
        console.print(f"  {key} = {value}", highlight=False)


@models_app.command("history")
@handles_errors
def models_history(
    name: str,
    alias: Annotated[str | None, typer.Option(help="Only this alias.")] = None,
) -> None:
    """Which version held each alias when (from the append-only audit log)."""
    registry = open_registry()
    table = Table("when (UTC)", "alias", "from", "to", "action", "who", "why")
    for e in registry.alias_history(name, alias):
        table.add_row(str(e.created_at), e.alias, str(e.from_version or "-"), str(e.to_version or "-"), e.action, e.actor, e.reason)
    console.print(table)


app.command("worker")(handles_errors(_worker_command))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
