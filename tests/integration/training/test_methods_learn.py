"""Each method learns on the tiny base, read back from the MLflow metrics of its run.

SFT lowers the eval loss (and logs exact-match accuracy at each evaluation, keeping the
best checkpoint); DPO raises the chosen-vs-rejected reward margin, also on tool calls; GRPO, started from a
short SFT cold start as in the R1 recipe, raises the mean verifiable reward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from forgeline import pipeline
from forgeline.recipe import load_recipe
from registry import lineage
from registry.client import Registry

pytestmark = pytest.mark.integration


def history(registry: Registry, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in registry.client.get_metric_history(run_id, key))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_sft_lowers_eval_loss_logs_accuracy_and_keeps_the_best_checkpoint(
    tiny_recipe: Callable[..., Path], one_thread: None
) -> None:
    path = tiny_recipe("sft-lora", train={"max_steps": 20, "save_steps": 5, "eval_steps": 5, "eval_samples": 16})
    registry = Registry()
    result = pipeline.train(load_recipe(path), path, registry=registry)

    eval_loss = history(registry, result.run_id, "eval_loss")
    assert [step for step, _ in eval_loss] == [0, 5, 10, 15, 20]  # step 0: the base, before any update
    assert eval_loss[-1][1] < 0.5 * eval_loss[0][1], eval_loss
    accuracy = history(registry, result.run_id, "eval_accuracy")
    assert len(accuracy) == 5 and accuracy[-1][1] > accuracy[0][1], accuracy
    tags = registry.client.get_run(result.run_id).data.tags
    trained = [(s, v) for s, v in accuracy if s > 0]  # checkpoints exist from step 5 on
    best = max(v for _, v in trained)
    assert tags["forgeline.best_checkpoint"] == f"checkpoint-{next(s for s, v in trained if v == best)}"
    assert result.version.tags[lineage.METHOD] == "sft"


def test_sft_on_tool_use_conversations_learns_every_weighted_turn(
    tiny_recipe: Callable[..., Path], one_thread: None
) -> None:
    # OpenAI chat fine-tuning rows with tools, tool calls, tool results and weight-0 turns
    # (recipes/data/tool-use); the loss mask itself is checked in tests/unit/training/test_conversations.py.
    path = tiny_recipe("sft-tools", train={"max_steps": 10, "batch_size": 4, "logging_steps": 1, "save_steps": 10})
    registry = Registry()
    result = pipeline.train(load_recipe(path), path, registry=registry)
    loss = history(registry, result.run_id, "loss")
    assert mean([v for _, v in loss[-3:]]) < 0.8 * mean([v for _, v in loss[:3]]), loss
    assert result.version.tags[lineage.METHOD] == "sft"


def test_dpo_raises_the_chosen_vs_rejected_margin(tiny_recipe: Callable[..., Path], one_thread: None) -> None:
    path = tiny_recipe("dpo-lora", train={"max_steps": 20, "logging_steps": 2, "save_steps": 10, "eval_steps": 10, "eval_samples": 16})
    registry = Registry()
    result = pipeline.train(load_recipe(path), path, registry=registry)

    margins = history(registry, result.run_id, "rewards/margins")
    assert margins[0] == (1, 0.0)  # policy == reference before the first update
    assert mean([v for _, v in margins[-3:]]) > 0.2, margins
    eval_margins = history(registry, result.run_id, "eval_rewards/margins")
    assert [s for s, _ in eval_margins] == [0, 10, 20]
    assert abs(eval_margins[0][1]) < 1e-6 < eval_margins[1][1] < eval_margins[2][1], eval_margins
    accuracies = history(registry, result.run_id, "eval_rewards/accuracies")
    assert accuracies[0][1] == 0.0 and accuracies[-1][1] > 0.6, accuracies  # chosen ranked above rejected
    assert result.version.tags[lineage.METHOD] == "dpo" and result.version.tags[lineage.ADAPTER] == "lora"


def test_dpo_on_tool_calls_prefers_the_right_function(tiny_recipe: Callable[..., Path], one_thread: None) -> None:
    # Pairs with tools whose chosen and rejected answers are tool calls (recipes/data/tool-use/preferences-*),
    # rendered through the recipe's tool template (training/preferences.py).
    path = tiny_recipe("dpo-tools", train={"max_steps": 20, "logging_steps": 2, "save_steps": 20, "eval_steps": 20, "eval_samples": 16})
    registry = Registry()
    result = pipeline.train(load_recipe(path), path, registry=registry)

    margins = history(registry, result.run_id, "rewards/margins")
    assert margins[0] == (1, 0.0) and mean([v for _, v in margins[-3:]]) > 0.2, margins
    accuracies = history(registry, result.run_id, "eval_rewards/accuracies")
    assert accuracies[0][1] == 0.0 and accuracies[-1][1] > 0.6, accuracies  # the right call ranked above the wrong one
    assert result.version.tags[lineage.METHOD] == "dpo"


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_after_a_cold_start(tiny_recipe: Callable[..., Path], one_thread: None) -> None:
    registry = Registry()
    cold_path = tiny_recipe("sft-cold-start", train={"eval_steps": None})
    cold = pipeline.train(load_recipe(cold_path), cold_path, registry=registry)

    path = tiny_recipe("grpo-toy", model={"base": str(cold.adapter_dir)})
    result = pipeline.train(load_recipe(path), path, registry=registry)

    reward = history(registry, result.run_id, "reward")
    early = mean([v for s, v in reward if s <= 15])
    late = mean([v for s, v in reward if s >= 25])
    assert late > early + 0.1, reward
    fmt = history(registry, result.run_id, "rewards/r1_format/mean")
    assert mean([v for s, v in fmt if s >= 25]) > mean([v for s, v in fmt if s <= 15]), fmt
    assert history(registry, result.run_id, "rewards/numeric_match/mean"), "each reward function is logged"
    assert result.version.tags[lineage.METHOD] == "grpo"
    assert [v.version for v in registry.list_versions("tiny-grpo")] == [1]
