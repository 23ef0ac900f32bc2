"""The ``forgeline`` command line.

Every command prints one clear line per error (no traceback unless ``--debug``) and exits
2 for invalid input (a broken recipe), 1 for a refused or failed operation.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from registry.errors import ConfigError, ForgelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recipe in; governed OpenAI-compatible endpoint out.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models, versions and alias history.")
app.add_typer(models_app, name="models")
console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")]


def _exit_code(error: ForgelineError) -> int:
    return 2 if isinstance(error, ConfigError) or error.code == "invalid_config" else 1


def handles_errors(fn: F) -> F:
    """Render forgeline errors as one message and a meaningful exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ForgelineError as err:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(_exit_code(err)) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _registry() -> Any:
    from registry.client import Registry

    return Registry()


@app.command()
@handles_errors
def validate(
    recipe: RecipeArg,
    schema: Annotated[bool, typer.Option("--schema", help="Print the recipe JSON schema instead.")] = False,
) -> None:
    """Check a recipe; report every problem with its YAML path, value and fix (exit 2)."""
    from .recipe import Recipe, load_recipe

    if schema:
        console.print_json(json.dumps(Recipe.model_json_schema()))
        return
    loaded = load_recipe(recipe)
    console.print(f"[green]ok[/] {recipe}: {loaded.method.kind} ({loaded.adapter.kind}) of {loaded.model.base} → {loaded.name}")


@app.command()
@handles_errors
def train(recipe: RecipeArg) -> None:
    """Train, track and register one version from a recipe."""
    from . import pipeline
    from .recipe import load_recipe

    loaded = load_recipe(recipe)
    result = pipeline.train(loaded, recipe, registry=_registry())
    console.print(f"registered [bold]{result.version.name}[/] version {result.version.version} (run {result.run_id})")


@app.command()
@handles_errors
def evaluate(
    name: str,
    version: int,
    data: Annotated[str | None, typer.Option(help="Eval data file; default: the one recorded on the version.")] = None,
    max_samples: Annotated[int, typer.Option(help="Evaluate at most this many rows.")] = 200,
) -> None:
    """Score a version and its base on held-out data; record the metrics on the version."""
    from training.config import EvaluateSpec

    from . import pipeline

    report = pipeline.evaluate(_registry(), name, version, spec=EvaluateSpec(max_samples=max_samples), data=data)
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
) -> None:
    """Move an alias to a version if every gate of the policy passes (all-or-nothing)."""
    from registry.errors import PolicyRefused

    from . import pipeline

    registry = _registry()
    pol = _policy(recipe, policy)
    result = pipeline.check(registry, name, version, pol, alias=to)
    _print_gates(result)
    if not result.passed:
        raise PolicyRefused(f"promotion of {name} v{version} to {to} refused: {result.reason()}")
    pipeline.promote_version(registry, name, version, pol, alias=to, actor=getpass.getuser(), reason=reason or "forgeline promote")
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
) -> None:
    """Point an alias back at an earlier version (recorded in the audit log)."""
    from registry.promotion import rollback as do_rollback

    entry = do_rollback(_registry(), name, alias=alias, to_version=to, actor=getpass.getuser(), reason=reason or "forgeline rollback")
    console.print(f"{name}@{alias}: {entry.from_version} → {entry.to_version}")


@app.command()
@handles_errors
def build(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME@VERSION.")],
    target: Annotated[str, typer.Option(help="Engine target: torch.")] = "torch",
) -> None:
    """Build a version's serving artifact and log it on the version."""
    from . import pipeline

    built = pipeline.build(_registry(), ref, target=target)
    console.print(f"built {target} engine for {built.version.name} v{built.version.version}: {built.path}")


@app.command()
@handles_errors
def serve(
    model: Annotated[list[str], typer.Option("--model", help="Model ref to serve, e.g. quickstart@production (repeatable).")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda.")] = "auto",
) -> None:
    """Serve models through the OpenAI-compatible gateway until interrupted."""
    from serving.config import ServeSpec
    from serving.gateway.app import create_app
    from serving.gateway.server import run_server
    from serving.registry_models import registry_catalog

    spec = ServeSpec(host=host, port=port, device=device)
    catalog = registry_catalog(_registry(), model, spec=spec)
    console.print(f"serving {', '.join(model)} on http://{host}:{port}/v1")
    run_server(create_app(catalog, max_new_tokens=spec.max_new_tokens), host, port)


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
    registry = _registry()
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
    info = _registry().resolve(ref)
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
    registry = _registry()
    table = Table("when (UTC)", "alias", "from", "to", "action", "who", "why")
    for e in registry.audit.history(name, alias):
        table.add_row(str(e.created_at), e.alias, str(e.from_version or "-"), str(e.to_version or "-"), e.action, e.actor, e.reason)
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
