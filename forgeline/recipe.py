"""The recipe: one pydantic model, validated before anything runs.

``load_recipe`` reports *every* problem at once, each with its YAML path, the bad value
and a fix, as one ``ConfigError``. Relative paths in the recipe are resolved against the
recipe file's folder so a recipe runs the same from any working directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.config import ClusterSpec
from registry.errors import ConfigError, FieldProblem
from registry.policy import PromotionPolicy
from serving.config import ServeSpec
from training.base_checks import check_base
from training.cluster_job import check_cluster
from training.config import (
    AdapterSpec,
    DataSpec,
    DistributedSpec,
    EvaluateSpec,
    MethodSpec,
    ModelSpec,
    SFTMethod,
    TrainSpec,
)
from training.preflight import check_training
from training.suites.spec import load_suite

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Recipe(BaseModel):
    """A whole forgeline job: what to train, how to judge it, how to serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered model name (letters, digits, '.', '_', '-').")
    model: ModelSpec
    data: DataSpec
    method: MethodSpec = Field(default_factory=SFTMethod)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    promote: PromotionPolicy = Field(default_factory=PromotionPolicy)
    serve: ServeSpec = Field(default_factory=ServeSpec)


# Fixes for the pydantic error types users hit most; the message says what, this says how.
_FIXES: dict[str, str] = {
    "extra_forbidden": "remove it, or check its spelling against `forgeline validate --schema`",
    "missing": "add this field",
    "literal_error": "use one of the allowed values",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
    "float_parsing": "write a number, e.g. 0.001",
    "int_parsing": "write a whole number",
    "bool_parsing": "write true or false",
    "string_type": "write a string",
    "model_type": "write a mapping of keys to values",
    "dict_type": "write a mapping of keys to values",
    "list_type": "write a list",
    "union_tag_invalid": "use one of the allowed values",
    "union_tag_not_found": "add `kind`",
}
_METHOD_KINDS = ("sft", "dpo", "grpo")


def _yaml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def problems_from_validation(error: ValidationError) -> list[FieldProblem]:
    """Turn pydantic's errors into forgeline's path/value/fix problems."""
    problems = []
    for err in error.errors():
        # Discriminated unions append the tag to the location; it is noise for a reader.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if len(loc) > 1 and loc[0] == "method" and loc[1] in _METHOD_KINDS:
            loc = loc[:1] + loc[2:]  # `method.grpo.rewards` is `method.rewards` in the YAML
        value = err.get("input") if err["type"] != "missing" else None
        if isinstance(value, dict):
            value = None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(FieldProblem(_yaml_path(loc), message, value, _FIXES.get(err["type"])))
    return problems


def _resolve(base_dir: Path, value: str) -> str:
    """Resolve a recipe path against the recipe folder; hub ids (`org/name`) pass through."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = (base_dir / path).resolve()
    return str(candidate) if candidate.exists() or value.startswith((".", "~")) or _looks_like_file(value) else value


def _looks_like_file(value: str) -> bool:
    return value.endswith((".jsonl", ".json", ".parquet", ".csv"))


def _check_paths(recipe: Recipe) -> list[FieldProblem]:
    problems = []
    for path_name, value in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if value and _looks_like_file(value) and not Path(value).exists():
            problems.append(FieldProblem(path_name, "data file not found", value, "check the path (relative paths start at the recipe's folder)"))
    for index, suite_file in enumerate(recipe.evaluate.suites):
        try:
            load_suite(suite_file)
        except ConfigError as err:
            problems += [FieldProblem(f"evaluate.suites[{index}]", f"{err.source}: {p.path}: {p.message}", p.value, p.fix)
                         for p in err.problems]
    base = recipe.model.base
    if Path(base).is_absolute() and not Path(base).exists():
        problems.append(FieldProblem("model.base", "model folder not found", base, "give an existing folder or a hub id like `Qwen/Qwen2.5-0.5B`"))
    if not _NAME.match(recipe.name):
        problems.append(FieldProblem("name", "not a valid model name", recipe.name, "use letters, digits, '.', '_' or '-' (at most 64)"))
    return problems


def _inline_chat_template(raw: dict[str, Any], base_dir: Path) -> list[FieldProblem]:
    """``model.chat_template: templates/x.jinja`` → the file's text, so every launcher's job carries it."""
    model = raw.get("model")
    value = model.get("chat_template") if isinstance(model, dict) else None
    if not isinstance(value, str) or not value.strip().endswith(".jinja") or "\n" in value.strip():
        return []
    path = Path(_resolve(base_dir, value.strip()))
    if not path.is_file():
        return [FieldProblem("model.chat_template", "chat template file not found", value,
                             "give a .jinja file (relative paths start at the recipe's folder) or the template text")]
    raw["model"] = {**model, "chat_template": path.read_text()}
    return []


M = TypeVar("M", bound=BaseModel)


def parse_recipe_section(model: type[M], raw: Any, *, source: str, prefix: str = "") -> M:
    """Validate one section (e.g. a standalone policy file) with recipe-style errors."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = [FieldProblem(f"{prefix}{p.path}" if prefix else p.path, p.message, p.value, p.fix) for p in problems_from_validation(err)]
        raise ConfigError(problems=problems, source=source) from None


def parse_recipe(raw: Any, *, base_dir: Path, source: str = "recipe") -> Recipe:
    """Validate an already-parsed recipe mapping; see ``load_recipe``."""
    if not isinstance(raw, dict):
        raise ConfigError(problems=[FieldProblem("<root>", "a recipe must be a mapping", type(raw).__name__, "start from recipes/quickstart.yaml")], source=source)
    raw = dict(raw)
    for section, key in (("model", "base"), ("data", "train"), ("data", "eval"), ("distributed", "config_file")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            raw[section] = {**part, key: _resolve(base_dir, part[key])}
    evaluate = raw.get("evaluate")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("suites"), list):
        raw["evaluate"] = {**evaluate, "suites": [_resolve(base_dir, s) if isinstance(s, str) else s for s in evaluate["suites"]]}
    template_problems = _inline_chat_template(raw, base_dir)
    recipe = parse_recipe_section(Recipe, raw, source=source)
    problems = template_problems + _check_paths(recipe)
    # On a cluster, this machine's hardware is not what trains (local=False skips its GPU checks).
    problems += check_training(recipe.method, recipe.adapter, recipe.train, recipe.distributed, search_path=base_dir,
                               local=recipe.cluster.kind == "local")
    problems += check_cluster(recipe.cluster, recipe.distributed)
    problems += check_base(recipe.model, recipe.adapter).problems  # config and tokenizer only, no weights
    if problems:
        raise ConfigError(problems=problems, source=source)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        ConfigError: with every problem found, each naming its YAML path.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(problems=[FieldProblem("<file>", "recipe file not found", str(path), "pass the path to a YAML recipe, e.g. recipes/quickstart.yaml")], source=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(problems=[FieldProblem("<file>", f"not valid YAML: {err}".replace("\n", " "), None, "fix the YAML syntax")], source=str(path)) from None
    return parse_recipe(raw, base_dir=path.resolve().parent, source=str(path))


def recipe_warnings(recipe: Recipe) -> list[FieldProblem]:
    """What a valid recipe may not mean to do (e.g. `all-linear` leaving MoE experts out), with the fix."""
    return check_base(recipe.model, recipe.adapter).warnings


def recipe_hash(recipe: Recipe) -> str:
    """A stable digest of the validated recipe (lineage tag on every version)."""
    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16]
