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
    compared with the base checkpoint they were trained from.
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
    spec = EvaluateSpec(max_samples=max_samples, samples=samples, pass_k=pass_k, suites=[str(Path(s).resolve()) for s in suite or []])
    report = pipeline.evaluate(open_registry(), name, version, spec=spec, data=data, method=method, search_path=search_path)
    _print_metrics(report.metrics, report.base_metrics)


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
    runner: Annotated[str, typer.Option(help="tensorrt-llm: local (container runtime), slurm, kubernetes or none (prepare only).")] = "local",
    finalize: Annotated[bool, typer.Option("--finalize", help="tensorrt-llm: record a build that ran on Slurm or Kubernetes.")] = False,
) -> None:
    """Build a version's serving artifact and log it on the version."""
    from . import pipeline

    trtllm = None
    if target == "tensorrt-llm":
        from serving.artifacts.trtllm_build import build_options

        trtllm = build_options(quantize=quantize, tp=tp, backend=backend, multi_lora=multi_lora or bool(adapter))
    built = pipeline.build(open_registry(), ref, target=target, trtllm=trtllm, runner=runner, extra_adapters=adapter or [], finalize=finalize)
    if built.pending:
        console.print(f"{target} build job for {built.version.name} v{built.version.version} is ready ({runner}): {built.path}/job")
        return
    console.print(f"built {target} engine for {built.version.name} v{built.version.version}: {built.path}")


@app.command()
@handles_errors
def serve(
    model: Annotated[list[str] | None, typer.Option("--model", help="Model ref to serve, e.g. quickstart@production (repeatable).")] = None,
    base: Annotated[list[str] | None, typer.Option("--base", help="Operator base model to serve bare (`forgeline models add-base`); fine-tuned LoRA versions on it answer by their own name (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda.")] = "auto",
    recipe: Annotated[Path | None, typer.Option(help="Take the other serve options (canary, quotas, adapters) from this recipe's `serve` section.")] = None,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="Require API keys (`forgeline keys create`).")] = True,
    header_timeout: HeaderTimeout = None,
    body_timeout: BodyTimeout = None,
    keep_alive: KeepAlive = None,
    max_connections: MaxConnections = None,
    graceful_shutdown: GracefulShutdown = None,
) -> None:
    """Serve models through the OpenAI-compatible gateway until interrupted."""
    from serving.config import ServeSpec
    from serving.gateway.server import run_server
    from serving.registry_models import BaseSource
    from serving.service import build_gateway, configure_access_log

    from .finetune.base_models import BaseModelStore
    from .recipe import load_recipe

    refs, base_names = list(model or []), list(dict.fromkeys(base or []))
    if not refs and not base_names:
        raise ForgelineError(
            "nothing to serve: pass --model REF (a registry ref) and/or --base NAME (see `forgeline models bases`)",
            code=ErrorCode.INVALID_REQUEST,
            param="model",
        )
    serve_spec = load_recipe(recipe).serve if recipe else ServeSpec()
    limits = server_limits(serve_spec.limits, header_timeout=header_timeout, body_timeout=body_timeout,
                           keep_alive=keep_alive, max_connections=max_connections, graceful_shutdown=graceful_shutdown)
    spec = serve_spec.model_copy(
        update={"host": host, "port": port, "device": device, "auth": auth and serve_spec.auth, "limits": limits}
    )
    configure_access_log()
    try:
        store = BaseModelStore() if base_names else None
        records = [store.get(name) for name in base_names] if store else []
        bases = [BaseSource(name=r.name, source=r.source, chat_template=r.chat_template) for r in records]
        gateway = build_gateway(open_registry(), refs, spec, bases=bases)
        console.print(f"serving {', '.join(refs + base_names)} on http://{host}:{port}/v1 (API keys {'required' if spec.auth else 'OFF'})")
        run_server(gateway, host, port, limits=spec.limits)
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
            table.add_row(name, str(info.version), ",".join(info.aliases), _fmt(m.get("accuracy")), info.tags.get("forgeline.base_model", ""))
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
    for e in registry.audit.history(name, alias):
        table.add_row(str(e.created_at), e.alias, str(e.from_version or "-"), str(e.to_version or "-"), e.action, e.actor, e.reason)
    console.print(table)


app.command("worker")(handles_errors(_worker_command))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
