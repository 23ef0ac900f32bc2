from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.recipe import load_recipe, recipe_hash
from registry.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def quickstart_dict() -> dict:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["model"]["base"] = str((QUICKSTART.parent / raw["model"]["base"]).resolve())
    raw["data"] = {k: str((QUICKSTART.parent / v).resolve()) for k, v in raw["data"].items()}
    return raw


def test_quickstart_recipe_is_valid_and_paths_resolve_from_its_folder() -> None:
    recipe = load_recipe(QUICKSTART)
    assert recipe.name == "quickstart"
    assert Path(recipe.data.train).is_absolute() and Path(recipe.data.train).exists()
    assert Path(recipe.model.base) == (REPO / "assets" / "tiny-base").resolve()
    assert recipe.promote.thresholds["accuracy"].min == 0.8


def test_every_problem_is_reported_at_once_with_its_path(tmp_path: Path) -> None:
    raw = quickstart_dict()
    raw["train"]["learning_rate"] = -1
    raw["train"]["epocs"] = 3
    raw["adapter"]["kind"] = "lorra"
    del raw["data"]["train"]
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, raw))
    paths = {p.path for p in info.value.problems}
    assert paths == {"train.learning_rate", "train.epocs", "adapter.kind", "data.train"}
    text = str(info.value)
    assert "4 problem(s)" in text
    assert "got -1" in text and "got 'lorra'" in text
    assert "fix:" in text


def test_missing_data_file_names_the_field_and_path(tmp_path: Path) -> None:
    raw = quickstart_dict()
    raw["data"]["train"] = "nowhere/train.jsonl"
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, raw))
    [problem] = info.value.problems
    assert problem.path == "data.train"
    assert str(tmp_path / "nowhere" / "train.jsonl") in str(problem.value)


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_policy_errors_carry_the_promote_path(tmp_path: Path) -> None:
    raw = quickstart_dict()
    raw["promote"]["thresholds"] = {"accuracy": {}}
    raw["promote"]["to"] = "7"
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, raw))
    paths = {p.path for p in info.value.problems}
    assert paths == {"promote.thresholds.accuracy", "promote.to"}


def test_recipe_hash_changes_with_content() -> None:
    a = load_recipe(QUICKSTART)
    b = a.model_copy(update={"name": "other"})
    assert recipe_hash(a) != recipe_hash(b)
    assert recipe_hash(a) == recipe_hash(load_recipe(QUICKSTART))


def test_cli_validate_exits_2_and_prints_each_problem(tmp_path: Path) -> None:
    raw = quickstart_dict()
    raw["train"]["batch_size"] = 0
    raw["serve"]["prot"] = 8000
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, raw))])
    assert result.exit_code == 2
    assert "train.batch_size" in result.output and "serve.prot" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_ok() -> None:
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
