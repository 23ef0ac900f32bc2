"""``forgeline validate`` checks a recipe against its base model (config and tokenizer, no weights).

What ``train`` would refuse later is refused now, every problem at once with its YAML path,
value and fix; what a valid recipe silently leaves out (``all-linear`` on a Qwen2-MoE base
skips the fused routed experts) is a warning with the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.recipe import load_recipe, recipe_warnings
from registry.errors import ConfigError
from tests.support.families import build_family

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "recipes" / "data" / "support-tickets"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validate-bases")
    return {name: build_family(name, root) for name in ("llama3", "qwen2_moe", "mixtral", "gpt2")}


def _recipe(tmp_path: Path, base: Path, **adapter: Any) -> Path:
    raw = {
        "name": "t",
        "model": {"base": str(base)},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl")},
        "adapter": {"kind": "lora", **adapter},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    return {p.path: str(p) for p in info.value.problems}


def test_a_tokenizer_without_a_chat_template_is_refused_with_the_field_to_set(bases: dict[str, Path], tmp_path: Path) -> None:
    problems = _problems(_recipe(tmp_path, bases["gpt2"]))
    assert list(problems) == ["model.chat_template"]
    assert "no chat template" in problems["model.chat_template"] and "fix: set model.chat_template" in problems["model.chat_template"]
    raw = yaml.safe_load(_recipe(tmp_path, bases["gpt2"]).read_text())
    raw["model"]["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "fixed.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(tmp_path / "fixed.yaml").model.chat_template


def test_unsupported_target_modules_are_all_reported_with_their_index(bases: dict[str, Path], tmp_path: Path) -> None:
    path = _recipe(tmp_path, bases["llama3"], target_modules=["q_proj", "lm_head", "nope_proj", "mlp"])
    problems = _problems(path)
    assert list(problems) == ["adapter.target_modules[1]", "adapter.target_modules[2]", "adapter.target_modules[3]"]
    assert "output layer is not supported (got 'lm_head'); fix: remove it" in problems["adapter.target_modules[1]"]
    assert "no module of this name (got 'nope_proj')" in problems["adapter.target_modules[2]"]
    assert "LlamaMLP, which LoRA cannot adapt" in problems["adapter.target_modules[3]"]
    assert "q_proj, up_proj, v_proj" in problems["adapter.target_modules[3]"]  # the names that would work


def test_all_linear_on_qwen2_moe_is_refused_naming_the_routed_experts_it_leaves_out(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    problems = _problems(_recipe(tmp_path, bases["qwen2_moe"], target_modules="all-linear"))
    assert list(problems) == ["adapter.target_modules"]
    assert "leaves the routed experts unadapted: mlp.experts." in problems["adapter.target_modules"]
    assert "adapter.target_parameters: [mlp.experts." in problems["adapter.target_modules"]
    # Both fixes it names are accepted.
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert load_recipe(_recipe(tmp_path, bases["qwen2_moe"], target_parameters=experts)).adapter.target_parameters == experts
    explicit = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert recipe_warnings(load_recipe(_recipe(tmp_path, bases["qwen2_moe"], target_modules=explicit))) == []
    # On Mixtral PEFT maps all-linear onto the fused experts itself: nothing is left out.
    assert recipe_warnings(load_recipe(_recipe(tmp_path, bases["mixtral"]))) == []
    # A wrong parameter name is refused.
    problems = _problems(_recipe(tmp_path, bases["qwen2_moe"], target_parameters=["experts.nope"]))
    assert "no parameter of this name (got 'experts.nope')" in problems["adapter.target_parameters[0]"]


def test_the_cli_prints_every_problem_and_exits_2_or_a_warning_and_exits_0(bases: dict[str, Path], tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["validate", str(_recipe(tmp_path, bases["gpt2"], target_modules=["lm_head"]))], terminal_width=400)
    assert bad.exit_code == 2
    assert "2 problem(s)" in bad.output and "model.chat_template" in bad.output and "adapter.target_modules[0]" in bad.output
    hub = CliRunner().invoke(app, ["validate", str(_recipe(tmp_path, Path("SomeOrg/not-cached-model")))], terminal_width=400)
    assert hub.exit_code == 0, hub.output
    assert "warning: model.base: not on this machine" in hub.output and "ok " in hub.output


def test_validation_reads_no_weights(bases: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "llama3-config-only"  # config and tokenizer, no weights file at all
    shutil.copytree(bases["llama3"], base, ignore=shutil.ignore_patterns("*.safetensors"))
    assert list(_problems(_recipe(tmp_path, base, target_modules=["q_proj", "lm_head"]))) == ["adapter.target_modules[1]"]


def test_a_hub_base_that_is_not_here_is_not_downloaded_and_says_so(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, Path("SomeOrg/not-cached-model"), target_modules=["lm_head"]))
    [warning] = recipe_warnings(recipe)
    assert warning.path == "model.base" and "were not checked" in warning.message
