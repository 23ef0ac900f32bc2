"""The method/adapter/train/distributed sections: every problem named by its YAML path, with a fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forgeline.recipe import parse_recipe
from registry.errors import ConfigError
from training.config import DPOMethod, GRPOMethod, SFTMethod

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "recipes" / "data"


def recipe(**sections: object) -> dict:
    raw: dict = {
        "name": "t",
        "model": {"base": str(REPO / "assets" / "tiny-base")},
        "data": {"train": str(DATA / "support-tickets" / "train.jsonl")},
    }
    raw.update(sections)
    return raw


def problems(raw: dict, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_recipe(raw, base_dir=tmp_path)
    return [str(p) for p in info.value.problems]


def test_method_kind_selects_the_method_section(tmp_path: Path) -> None:
    assert isinstance(parse_recipe(recipe(), base_dir=tmp_path).method, SFTMethod)
    dpo = parse_recipe(recipe(method={"kind": "dpo", "beta": 0.2}), base_dir=tmp_path).method
    assert isinstance(dpo, DPOMethod) and dpo.beta == 0.2
    grpo = parse_recipe(
        recipe(method={"kind": "grpo", "num_generations": 4, "rewards": [{"name": "numeric_match"}, {"name": "r1_format", "weight": 0.5}]},
               train={"batch_size": 8}),
        base_dir=tmp_path,
    ).method
    assert isinstance(grpo, GRPOMethod)
    assert [r.reference_field() for r in grpo.rewards] == ["answer", None]


def test_method_errors_name_the_yaml_path_without_the_union_tag(tmp_path: Path) -> None:
    found = problems(recipe(method={"kind": "grpo", "rewards": [{"name": "nope"}], "beta": -1}), tmp_path)
    assert any(p.startswith("method.rewards[0].name: unknown reward 'nope'") for p in found), found
    assert any(p.startswith("method.beta:") for p in found), found
    assert not any("grpo" in p.split(":")[0] for p in found)
    found = problems(recipe(method={"kind": "ppo"}), tmp_path)
    assert found[0].startswith("method:") and "ppo" in found[0]


def test_grpo_batch_must_hold_whole_groups(tmp_path: Path) -> None:
    raw = recipe(method={"kind": "grpo", "num_generations": 8, "rewards": [{"name": "r1_format"}]}, train={"batch_size": 6})
    [found] = problems(raw, tmp_path)
    assert found.startswith("train.batch_size:") and "num_generations" in found and "fix:" in found


def test_user_reward_that_cannot_be_imported_is_a_recipe_problem(tmp_path: Path) -> None:
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    ok = recipe(method={"kind": "grpo", "num_generations": 2, "rewards": [{"name": "my_rewards:short"}]}, train={"batch_size": 2})
    assert parse_recipe(ok, base_dir=tmp_path).method.rewards[0].name == "my_rewards:short"
    bad = recipe(method={"kind": "grpo", "num_generations": 2, "rewards": [{"name": "my_rewards:long"}, {"name": "nomodule:f"}]},
                 train={"batch_size": 2})
    found = problems(bad, tmp_path)
    assert found[0].startswith("method.rewards[0].name: module 'my_rewards' has no function 'long'")
    assert found[1].startswith("method.rewards[1].name: cannot import module 'nomodule'")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="qlora is valid on a GPU machine")
def test_qlora_without_a_gpu_is_a_validation_error_naming_the_field_and_fix(tmp_path: Path) -> None:
    found = problems(recipe(adapter={"kind": "qlora"}), tmp_path)
    assert found[0].startswith("adapter.kind: qlora loads the base in 4 bits")
    assert "CUDA GPU" in found[0] and "fix: use `kind: lora`" in found[0]


def test_distributed_section_checks(tmp_path: Path) -> None:
    ok = parse_recipe(recipe(distributed={"strategy": "deepspeed", "zero_stage": 3, "nproc": 2}), base_dir=tmp_path)
    assert ok.distributed.zero_stage == 3
    assert "strategy is `none`" in problems(recipe(distributed={"nproc": 2}), tmp_path)[0]
    assert "ddp needs nproc >= 2" in problems(recipe(distributed={"strategy": "ddp"}), tmp_path)[0]
    assert "only apply to strategy: deepspeed" in problems(recipe(distributed={"strategy": "ddp", "nproc": 2, "offload": "cpu"}), tmp_path)[0]
    found = problems(recipe(distributed={"strategy": "deepspeed", "nproc": 2, "config_file": "ds.json"}), tmp_path)
    assert found[0].startswith("distributed.config_file: DeepSpeed config file not found")


def test_best_metric_needs_evaluations_and_a_metric_the_method_logs(tmp_path: Path) -> None:
    assert "set eval_steps" in problems(recipe(train={"best_metric": "accuracy"}), tmp_path)[0]
    assert "multiple of eval_steps" in problems(recipe(train={"best_metric": "loss", "eval_steps": 3, "save_steps": 10}), tmp_path)[0]
    found = problems(recipe(method={"kind": "dpo"}, train={"best_metric": "accuracy", "eval_steps": 5, "save_steps": 10}), tmp_path)
    assert found[0].startswith("train.best_metric: dpo does not log this eval metric") and "rewards/margins" in found[0]
    assert parse_recipe(recipe(train={"best_metric": "eval_accuracy", "eval_steps": 5, "save_steps": 10}), base_dir=tmp_path)


def test_every_shipped_recipe_validates(repo_root: Path) -> None:
    from forgeline.recipe import load_recipe

    for path in sorted((repo_root / "recipes").rglob("*.yaml")):
        assert path.read_text().startswith("# Run"), f"{path} must begin with the command that runs it"
        if path.parent.name == "policies":  # promotion policies, not recipes
            from registry.policy import PromotionPolicy

            PromotionPolicy.model_validate(yaml.safe_load(path.read_text()))
            continue
        if "suites" in path.relative_to(repo_root / "recipes").parts:  # evaluation suites and their harness tasks
            from training.suites.lm_eval_suite import task_config
            from training.suites.spec import load_suite

            if path.parent.name == "suites":
                load_suite(path)
            else:
                assert Path(task_config(str(path))["dataset_kwargs"]["data_files"]["test"]).is_file()
            continue
        load_recipe(path)
