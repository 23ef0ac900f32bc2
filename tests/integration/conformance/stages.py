"""One conformance cell through forgeline's own stages, as a user runs them.

validate (``forgeline.recipe.load_recipe``) → train + track + register (``pipeline.train``)
→ evaluate (``pipeline.evaluate``) → promote (``pipeline.promote_version``) → build
(``pipeline.build``) → serve (``serving.service.build_gateway`` on loopback) → the stock
``openai`` SDK. Each stage's result is kept on the `CellRun`, so a test can say which stage
a cell reached and what it showed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "recipes" / "data"
STAGES = ("validate", "train", "evaluate", "promote", "build", "serve", "openai")
SYSTEMLESS = ("gemma2", "mixtral")  # their templates refuse a system turn (as the real ones do)


@dataclass(frozen=True)
class Cell:
    """One family × method × adapter combination."""

    family: str
    method: str  # sft | dpo | grpo
    adapter: str  # lora | none | qlora
    chat_template: bool = False  # give model.chat_template in the recipe (families that ship none)
    variant: str = ""  # tells apart cells of one combination that differ in another recipe field

    @property
    def id(self) -> str:
        tail = ("-template" if self.chat_template else "") + (f"-{self.variant}" if self.variant else "")
        return f"{self.family}-{self.method}-{self.adapter}{tail}"

    @property
    def name(self) -> str:
        return f"conf-{self.id}".replace("_", "-")


@dataclass
class CellRun:
    """What each stage of one cell produced."""

    cell: Cell
    recipe: Any = None
    version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    promoted: bool = False
    engine_dir: Path | None = None
    replies: list[Any] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)


def _sample(source: Path, out: Path, n: int, seed: int = 0) -> Path:
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    out.write_text("\n".join(rows[:n]) + "\n")
    return out


def write_data(cell: Cell, folder: Path) -> dict[str, str]:
    """Small train/eval files for the cell's method (the shipped recipe data, sampled)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = {"sft": "support-tickets", "dpo": "support-preferences", "grpo": "toy-arithmetic"}[cell.method]
    train = _sample(DATA / source / "train.jsonl", folder / "train.jsonl", 64)
    evaluation = _sample(DATA / source / "eval.jsonl", folder / "eval.jsonl", 8)
    return {"train": str(train), "eval": str(evaluation)}


GENERIC_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def recipe_dict(cell: Cell, base: Path, data: dict[str, str]) -> dict[str, Any]:
    """A tiny-settings recipe for the cell (seconds of CPU training)."""
    method: dict[str, Any] = {"kind": cell.method}
    train: dict[str, Any] = {"max_steps": 3, "learning_rate": 0.002, "batch_size": 4, "max_length": 96,
                             "logging_steps": 1, "save_steps": 50}
    if cell.method == "grpo":
        method.update(num_generations=4, max_completion_length=8,
                      rewards=[{"name": "numeric_match", "field": "answer", "weight": 1.0}])
        train["max_steps"] = 2
    adapter: dict[str, Any] = {"kind": cell.adapter}
    if cell.adapter != "none":
        adapter.update(r=4, alpha=8, target_modules="all-linear")
    model: dict[str, Any] = {"base": str(base)}
    if cell.chat_template:
        model["chat_template"] = GENERIC_TEMPLATE
    return {
        "name": cell.name,
        "model": model,
        "data": data,
        "method": method,
        "adapter": adapter,
        "train": train,
        "evaluate": {"max_samples": 8, "max_new_tokens": 6, "batch_size": 8},
        # The matrix checks code paths, not learning (random weights): the gate reads recorded metrics
        # (RL versions are scored by their rewards, SFT and DPO by loss).
        "promote": {"to": "production", "thresholds": (
            {"reward": {"min": -1000.0}} if cell.method == "grpo" else {"eval_loss": {"max": 1000.0}}
        )},
        "serve": {"engine": "torch", "port": 0, "auth": False, "max_new_tokens": 16},
    }


def write_recipe(
    cell: Cell, base: Path, folder: Path, *, overrides: dict[str, Any] | None = None, data: dict[str, str] | None = None
) -> Path:
    """The cell's recipe file; ``overrides`` replace whole sections or update mapping sections."""
    raw = recipe_dict(cell, base, data or write_data(cell, folder / "data"))
    for section, value in (overrides or {}).items():
        raw[section] = {**raw[section], **value} if isinstance(value, dict) and isinstance(raw.get(section), dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def validate(path: Path) -> Any:
    from forgeline.recipe import load_recipe

    return load_recipe(path)


@contextmanager
def served(refs: list[str], spec: Any, *, bases: tuple[Any, ...] = ()) -> Iterator[str]:
    """The gateway serving ``refs`` (and ``bases``) on a free loopback port; yields its base URL."""
    from registry.client import Registry
    from serving.gateway.server import serve_in_background
    from serving.service import build_gateway

    app = build_gateway(Registry(), refs, spec, bases=bases)
    base_url, stop = serve_in_background(app)
    try:
        yield base_url
    finally:
        stop()


def ask(base_url: str, model: str, messages: list[dict[str, str]], *, max_tokens: int = 8) -> Any:
    """One greedy chat completion through the stock openai SDK."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="conformance", max_retries=0)
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)


def question(cell: Cell) -> list[dict[str, str]]:
    """A held-out prompt of the cell's task, as chat messages."""
    row = json.loads(Path(cell_eval_file(cell)).read_text().splitlines()[0])
    return row["prompt"]


def cell_eval_file(cell: Cell) -> Path:
    source = {"sft": "support-tickets", "dpo": "support-preferences", "grpo": "toy-arithmetic"}[cell.method]
    return DATA / source / "eval.jsonl"


def run_cell(
    cell: Cell,
    base: Path,
    folder: Path,
    *,
    until: str = "openai",
    overrides: dict[str, Any] | None = None,
    data: dict[str, str] | None = None,
) -> CellRun:
    """Run ``cell`` through the stages up to ``until``; a failing stage raises (its error, unchanged)."""
    from forgeline import pipeline
    from registry.client import Registry

    run = CellRun(cell)
    path = write_recipe(cell, base, folder, overrides=overrides, data=data)
    run.recipe = recipe = validate(path)
    run.reached.append("validate")
    if until == "validate":
        return run
    registry = Registry()
    result = pipeline.train(recipe, path, registry=registry)
    run.version = result.version.version
    run.reached.append("train")
    if until == "train":
        return run
    report = pipeline.evaluate(registry, recipe.name, run.version, spec=recipe.evaluate)
    run.metrics, run.base_metrics = report.metrics, report.base_metrics
    run.reached.append("evaluate")
    if until == "evaluate":
        return run
    pipeline.promote_version(registry, recipe.name, run.version, recipe.promote, alias=recipe.promote.to,
                             actor="conformance", reason=f"conformance cell {cell.id}")
    run.promoted = True
    run.reached.append("promote")
    if until == "promote":
        return run
    built = pipeline.build(registry, f"{recipe.name}@{recipe.promote.to}")
    run.engine_dir = built.path
    run.reached.append("build")
    if until == "build":
        return run
    with served([recipe.name], recipe.serve) as base_url:
        run.reached.append("serve")
        if until == "serve":
            return run
        for ref in (recipe.name, f"{recipe.name}@{run.version}"):
            run.replies.append(ask_raw(base_url, ref, question(cell)))
    run.reached.append("openai")
    return run


def serve_by_name(run: CellRun, base: Path, *, rounds: int = 2) -> list[Any]:
    """Serve the cell's base bare and ask, in turn, the LoRA version by its own name (routed onto
    the base as an adapter) and the bare base; returns every reply."""
    from serving.registry_models import BaseSource

    base_name = f"{run.cell.family.replace('_', '-')}-base"
    # A base that ships no chat template is registered with one (`forgeline models add-base --chat-template`).
    source = BaseSource(base_name, str(base), chat_template=GENERIC_TEMPLATE if run.cell.chat_template else None)
    replies = []
    with served([], run.recipe.serve, bases=(source,)) as base_url:
        for _ in range(rounds):
            for model in (run.recipe.name, base_name):
                replies.append(ask_raw(base_url, model, question(run.cell)))
    return replies


def ask_raw(base_url: str, model: str, messages: list[dict[str, str]], *, max_tokens: int = 8) -> Any:
    """Like `ask`, but the raw response: ``.headers`` and ``.parse()``."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="conformance", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
