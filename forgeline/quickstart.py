"""``forgeline quickstart``: one recipe through every stage, visibly, on the embedded defaults."""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from registry.client import Registry
from registry.errors import PolicyRefused
from registry.settings import forgeline_home, tracking_uri

from . import pipeline
from .recipe import load_recipe

STAGES = ("validate", "train", "track", "register", "evaluate", "promote", "build", "serve", "call")


class _Stages:
    """Numbered stage headers with elapsed time, so a person sees where the run is."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, spinner: bool = True) -> Iterator[None]:
        index = STAGES.index(name) + 1
        self.console.rule(f"[bold cyan][{index}/{len(STAGES)}] {name}[/]", align="left")
        began = time.perf_counter()
        if spinner:
            with self.console.status(f"{name}…"):
                yield
        else:
            yield
        self.console.print(f"[dim]{name} took {time.perf_counter() - began:.1f}s[/]")


def run_quickstart(recipe_path: Path, *, console: Console, keep_serving: bool = False, questions: int = 3) -> dict[str, object]:
    """Run ``recipe_path`` end to end and return what happened (also printed).

    Raises:
        ConfigError: the recipe is invalid (nothing ran).
        PolicyRefused: the new version failed a gate (no alias moved; nothing served).
    """
    stages = _Stages(console)
    registry = Registry()
    console.print(f"state: {forgeline_home()}  (MLflow: {tracking_uri()})")

    with stages.stage("validate"):
        recipe = load_recipe(recipe_path)
        console.print(f"recipe ok: {recipe.method.kind} + {recipe.adapter.kind} on {recipe.model.base}")

    with stages.stage("train", spinner=False):
        result = pipeline.train(recipe, recipe_path, registry=registry)
        loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
        console.print(f"trained {len(result.data.train)} rows; final train loss {loss}")

    with stages.stage("track"):
        console.print(f"MLflow run {result.run_id}: params, per-step metrics, datasets (digest {result.data.digest}), recipe, adapter")

    version = result.version
    with stages.stage("register"):
        console.print(f"{version.name} version {version.version}; lineage:")
        for key, value in sorted(version.tags.items()):
            console.print(f"  {key} = {value}", highlight=False)

    with stages.stage("evaluate"):
        report = pipeline.evaluate(registry, version.name, version.version, spec=recipe.evaluate)
        table = Table("metric", f"v{version.version}", "base")
        for key, value in report.metrics.items():
            table.add_row(key, f"{value:.4f}", f"{report.base_metrics.get(key, float('nan')):.4f}")
        console.print(table)

    with stages.stage("promote"):
        gates = pipeline.check(registry, version.name, version.version, recipe.promote)
        for gate in gates.gates:
            console.print(f"  {'[green]pass[/]' if gate.passed else '[red]FAIL[/]'} {gate.name}: {gate.detail}", highlight=False)
        if not gates.passed:
            raise PolicyRefused(f"promotion of {version.name} v{version.version} refused: {gates.reason()}")
        pipeline.promote_version(
            registry, version.name, version.version, recipe.promote,
            alias=recipe.promote.to, actor=getpass.getuser(), reason=f"quickstart: {recipe_path}",
        )
        console.print(f"{version.name}@{recipe.promote.to} → version {version.version} (audit log updated)")

    ref = f"{version.name}@{recipe.promote.to}"
    with stages.stage("build"):
        built = pipeline.build(registry, ref)
        console.print(f"merged engine artifact: {built.path}")

    from serving.gateway.app import create_app
    from serving.gateway.server import serve_in_background
    from serving.registry_models import registry_catalog

    with stages.stage("serve"):
        catalog = registry_catalog(registry, [ref], spec=recipe.serve)
        base_url, stop = serve_in_background(create_app(catalog, max_new_tokens=recipe.serve.max_new_tokens), host=recipe.serve.host, port=recipe.serve.port)
        console.print(f"gateway up: {base_url}/v1 serving {ref}")

    try:
        with stages.stage("call"):
            answers = _call(base_url, version.name, result.data.eval[:questions], console)
        if keep_serving:
            console.print(f"serving at {base_url}/v1 — Ctrl-C to stop")
            while True:
                time.sleep(3600)
    finally:
        stop()
    console.print(f"[bold green]done[/] in {time.perf_counter() - stages.start:.0f}s")
    return {"version": version.version, "metrics": report.metrics, "base_metrics": report.base_metrics, "answers": answers}


def _call(base_url: str, model: str, rows: list[dict], console: Console) -> list[tuple[str, str, str]]:
    """Ask held-out questions through the stock ``openai`` SDK, as a customer would."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="quickstart")
    table = Table("question", "expected", "answer")
    out = []
    for row in rows:
        messages = row["prompt"] if "prompt" in row else row["messages"][:-1]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if "completion" in row:
            completion = row["completion"]
            expected = completion if isinstance(completion, str) else completion[-1]["content"]
        elif "messages" in row:
            expected = row["messages"][-1]["content"]
        else:  # GRPO prompt rows carry a reference answer instead
            expected = str(row.get("answer", ""))
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        answer = (reply.choices[0].message.content or "").strip()
        out.append((messages[-1]["content"], expected, answer))
        table.add_row(messages[-1]["content"][:70], expected, answer)
    console.print(table)
    return out
