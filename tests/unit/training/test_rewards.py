"""Built-in GRPO rewards and user reward functions named `module:function`."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import RewardSpec
from training.rewards import RewardError, json_valid, numeric_match, r1_format, resolve_rewards


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_numeric_match_reads_the_answer_block_and_tolerates_formatting() -> None:
    completions = ["<think>3+4=7</think><answer>7</answer>", "<think>7</think><answer>8</answer>", "It is 1,234.0 dollars", "no number"]
    assert numeric_match(completions, answer=["7", "7", "1234", "3"]) == [1.0, 0.0, 1.0, 0.0]
    assert numeric_match([chat("<answer> -3 </answer>")], answer=["-3"]) == [1.0]


def test_r1_format_needs_think_then_answer_and_nothing_else() -> None:
    good = "<think>\nadd them\n</think>\n<answer>7</answer>\n"
    bad = ["<answer>7</answer>", "<think>x</think><answer>7</answer> trailing", "<think><think>x</think><answer>7</answer>", "<think>x</think>"]
    assert r1_format([good, chat(good)]) == [1.0, 1.0]
    assert r1_format(bad) == [0.0] * len(bad)


def test_json_valid() -> None:
    assert json_valid(['{"a": 1}', '```json\n[1, 2]\n```', "<answer>{\"k\": true}</answer>", "{'a': 1}", "{"]) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_exact_match_uses_the_configured_reference_field() -> None:
    [exact], weights = resolve_rewards([RewardSpec(name="exact_match", field="label", weight=2.0)])
    assert weights == [2.0]
    assert exact([" Billing ", "<answer>refund</answer>", "shipping"], label=["billing", "refund", "account"]) == [1.0, 1.0, 0.0]


def test_user_reward_is_imported_from_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "shop_rewards.py").write_text(
        "def brevity(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    [brevity], _ = resolve_rewards([RewardSpec(name="shop_rewards:brevity")], search_path=tmp_path)
    assert brevity(["", "abc"]) == [1.0, 0.25]
    with pytest.raises(RewardError) as info:
        resolve_rewards([RewardSpec(name="shop_rewards:missing")], search_path=tmp_path)
    assert info.value.problem.path == "method.rewards[0].name"
