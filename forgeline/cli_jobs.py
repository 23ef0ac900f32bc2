"""``forgeline jobs``: list, status, logs, wait and cancel jobs of every stage and kind, and
the submitting side of ``forgeline train --cluster ...`` (a recipe to Slurm, Kubernetes, a
DeepSpeed hostfile, or this machine in the background) and ``forgeline evaluate|build
--cluster FILE`` (the same command, run as a job where the cluster file says).

Jobs are kept in the control database (``jobs.store``), so any later command can follow
or cancel a job. Self-contained (no import of ``forgeline.cli``) so
``cli`` registers it with one ``add_typer`` line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from forgeline.cli_shared import console, err_console, handles_errors
from registry.errors import ErrorCode, FieldProblem, ForgelineError

if TYPE_CHECKING:
    from jobs.base import JobSpec, JobStatus
    from jobs.config import ClusterSpec
    from jobs.store import JobRecord

    from .recipe import Recipe

jobs_app = typer.Typer(no_args_is_help=True, help="Training, evaluation and build jobs on this machine, Slurm or Kubernetes: "
                       "list, status, logs, wait, cancel.")

JobIdArg = Annotated[str, typer.Argument(help="Job id (fl-...), or a unique prefix of it.")]


def cluster_with_overrides(recipe: Recipe, source: str, **overrides: Any) -> ClusterSpec:
    """The recipe's ``cluster`` section with command-line overrides (unset ones are ignored), validated.

    Raises:
        ConfigError: the combination is invalid (named by its ``cluster.`` path).
    """
    from jobs.config import ClusterSpec, applies_to
    from registry.errors import ConfigError
    from training.cluster_job import check_cluster

    from .recipe import parse_recipe_section

    values = recipe.cluster.model_dump(exclude_unset=True)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("kind") and given["kind"] != recipe.cluster.kind:
        # The recipe's settings were for another kind: keep those the new kind also reads.
        values = {k: v for k, v in values.items() if k != "kind" and applies_to(k, given["kind"])}
    values.update(given)
    try:
        cluster = parse_recipe_section(ClusterSpec, values, source=source)
    except ConfigError as err:
        raise ConfigError(problems=[_in_cluster(p) for p in err.problems], source=source) from None
    problems = check_cluster(cluster, recipe.distributed)
    if problems:
        raise ConfigError(problems=problems, source=source)
    return cluster


def load_cluster_file(path: Path) -> ClusterSpec:
    """A cluster file (the recipe's ``cluster`` section on its own, as YAML), validated.

    Raises:
        ConfigError: the file is not a valid cluster section (each problem named by its field).
    """
    import yaml

    from jobs.config import ClusterSpec
    from registry.errors import ConfigError

    from .recipe import parse_recipe_section

    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(problems=[FieldProblem("--cluster", f"cannot read {path}: {err}", str(path),
                                                 "pass a YAML file with the recipe's `cluster` fields, e.g. `kind: slurm`")],
                          source=str(path)) from None
    if isinstance(values, dict) and set(values) == {"cluster"}:
        values = values["cluster"]  # a recipe-shaped file holding only the section
    return parse_recipe_section(ClusterSpec, values, source=str(path))


def run_as_job(spec: JobSpec, *, detach: bool, timeout_s: float | None = None, poll_s: float = 3.0) -> JobRecord:
    """Submit ``spec``, say where it went, and unless ``detach`` follow it to its end.

    Raises:
        ForgelineError: the job failed or was cancelled (exit 1), with the end of its log.
    """
    from jobs import submission
    from jobs.base import JobPhase

    handle = submission.submit(spec)
    cluster = spec.cluster
    where = f"{handle.kind} job {handle.backend_id}" if handle.backend_id else handle.kind
    size = f"; {cluster.nodes} node(s) x {cluster.nproc_per_node} process(es)" if spec.torchrun else ""
    console.print(f"submitted [bold]{handle.id}[/] ({spec.stage}: {where}{size})")
    console.print(f"  logs: forgeline jobs logs {handle.id}", highlight=False)
    if detach:
        return submission.get_record(handle.id)
    record = submission.wait(
        handle.id, poll_s=poll_s, timeout_s=timeout_s,
        on_change=lambda status: console.print(f"  {time.strftime('%H:%M:%S')} {_describe(status)}", highlight=False),
    )
    status = record.status
    if status.phase is not JobPhase.SUCCEEDED:
        # Printed as plain text: log lines are full of brackets that rich would read as markup.
        err_console.out(f"last lines of the log of {handle.id}:\n{submission.job_logs(handle.id, tail=20)}", highlight=False)
        again = "; submitting the recipe again resumes from its newest complete checkpoint" if spec.stage == "train" else ""
        raise ForgelineError(
            f"{spec.stage} job {handle.id} {status.phase.value} ({status.detail}); fix: see `forgeline jobs logs {handle.id}`"
            + again,
            code=ErrorCode.INTERNAL,
        )
    return record


def _in_cluster(problem: FieldProblem) -> FieldProblem:
    path = "cluster" if problem.path == "<root>" else f"cluster.{problem.path}"
    return FieldProblem(path, problem.message, problem.value, problem.fix)


def _describe(status: JobStatus) -> str:
    text = f"{status.phase.value}"
    if status.detail:
        text += f" [{status.detail}]"
    if status.restarts:
        text += f", restarts: {status.restarts}"
    if status.nodes:
        text += f", nodes: {','.join(status.nodes)}"
    return escape(text)  # scheduler words like `[PENDING]` are text, not rich markup


def train_on_cluster(recipe: Recipe, recipe_file: Path, cluster: ClusterSpec, *, detach: bool, timeout_s: float | None = None,
                     poll_s: float = 3.0) -> JobRecord:
    """Submit the recipe's training job to ``cluster``; unless ``detach``, wait for its version.

    Raises:
        ForgelineError: the job failed or was cancelled (exit 1), with the end of its log.
    """
    from training.cluster_job import train_spec

    from .pipeline import job_from_recipe

    recipe = recipe.model_copy(update={"cluster": cluster})
    record = run_as_job(train_spec(job_from_recipe(recipe, recipe_file), cluster), detach=detach, timeout_s=timeout_s,
                        poll_s=poll_s)
    status = record.status
    if detach:
        return record
    if status.version is not None:
        resumed = f", resumed from step {status.resumed_from_step}" if status.resumed_from_step else ""
        console.print(f"registered [bold]{record.handle.name}[/] version {status.version} (run {status.run_id}{resumed})")
    else:
        console.print(f"job {record.id} succeeded; its result is not readable from here (on the cluster's storage): "
                      "see `forgeline models list`")
    return record


def _phase_style(phase: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "requeued": "magenta"}.get(phase, "")


@jobs_app.command("list")
@handles_errors
def jobs_list(
    kind: Annotated[str | None, typer.Option(help="Only this kind: local, slurm, kubernetes, hostfile.")] = None,
    model: Annotated[str | None, typer.Option(help="Only jobs on this model.")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage: train, evaluate, build.")] = None,
    limit: Annotated[int, typer.Option(help="Newest jobs shown.")] = 50,
    refresh: Annotated[bool, typer.Option("--refresh/--no-refresh", help="Ask the schedulers about unfinished jobs first.")] = True,
) -> None:
    """Jobs (training, evaluation, builds), newest first, with their last known status."""
    from jobs import submission as jobs
    from jobs.store import JobStore

    store = JobStore()
    records = store.list_jobs(kind=kind, name=model, stage=stage, limit=limit)
    if refresh:
        fresh = []
        for record in records:
            if not record.status.phase.finished:
                try:
                    record = jobs.refresh(record.id, store=store)
                except ForgelineError as err:  # one unreachable scheduler must not hide the other jobs
                    err_console.print(f"[yellow]warning:[/] {record.id}: {escape(str(err))}", highlight=False)
            fresh.append(record)
        records = fresh
    table = Table()
    table.add_column("job", no_wrap=True)  # ids are what users copy: never wrapped or cut
    for column in ("stage", "model", "kind", "scheduler id"):
        table.add_column(column)
    table.add_column("status", no_wrap=True)
    for column in ("restarts", "version", "submitted (UTC)"):
        table.add_column(column)
    for r in records:
        phase = r.status.phase.value
        style = _phase_style(phase)
        table.add_row(
            r.id, r.handle.stage, r.handle.name, r.handle.kind, r.handle.backend_id, f"[{style}]{phase}[/]" if style else phase,
            str(r.status.restarts), str(r.status.version or "-"), f"{r.handle.submitted_at:%m-%d %H:%M}",
        )
    console.print(table)


@jobs_app.command("status")
@handles_errors
def jobs_status(job_id: JobIdArg) -> None:
    """One job's status, asked of its scheduler now."""
    from jobs import submission as jobs

    record = jobs.refresh(job_id)
    h, s = record.handle, record.status
    console.print(f"[bold]{h.id}[/] {escape(h.name)} on {h.kind} ({h.backend_id or '-'}): {_describe(s)}", highlight=False)
    if s.version is not None:
        console.print(f"  version: {s.version} (run {s.run_id})" + (f", resumed from step {s.resumed_from_step}" if s.resumed_from_step else ""))
    console.print(f"  stage: {h.stage}")
    console.print(f"  submitted: {h.submitted_at:%Y-%m-%d %H:%M:%S} UTC by {record.actor}", highlight=False)
    console.print(f"  job files: {h.job_dir}", highlight=False)
    console.print(f"  {'checkpoints' if h.stage == 'train' else 'output'}: {h.output_dir}", highlight=False)


@jobs_app.command("logs")
@handles_errors
def jobs_logs(
    job_id: JobIdArg,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output until the job ends.")] = False,
) -> None:
    """The job's output (every node's, every attempt's)."""
    from jobs import submission as jobs

    text = jobs.job_logs(job_id, tail=tail)
    console.out(text, end="", highlight=False)
    if not follow:
        return
    seen = len(jobs.job_logs(job_id))
    while True:
        record = jobs.refresh(job_id)
        full = jobs.job_logs(job_id)
        if len(full) > seen:
            console.out(full[seen:], end="", highlight=False)
            seen = len(full)
        if record.status.phase.finished:
            return
        time.sleep(2.0)


@jobs_app.command("wait")
@handles_errors
def jobs_wait(
    job_id: JobIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (the job keeps running).")] = None,
) -> None:
    """Wait for a job to end; exit 0 when it succeeded, 1 otherwise."""
    from jobs import submission as jobs
    from jobs.base import JobPhase

    record = jobs.wait(job_id, timeout_s=timeout,
                       on_change=lambda s: console.print(f"{time.strftime('%H:%M:%S')} {_describe(s)}", highlight=False))
    if record.status.version is not None:
        console.print(f"registered {record.handle.name} version {record.status.version}")
    if record.status.phase is not JobPhase.SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("cancel")
@handles_errors
def jobs_cancel(job_id: JobIdArg) -> None:
    """Stop a job. A training job's checkpoints stay: submitting the same recipe again resumes from them."""
    from jobs import submission as jobs

    record = jobs.cancel(job_id)
    console.print(f"{record.id}: {record.status.phase.value}")
