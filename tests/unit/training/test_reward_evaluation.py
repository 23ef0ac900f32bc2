"""RL versions are scored with their recipe's rewards: TRL-shaped calls, per-prompt pass@k."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support.tiny_model import build_tiny_base
from training.config import EvaluateSpec, GRPOMethod, RewardSpec
from training.evaluation import to_examples
from training.reward_evaluation import evaluate_rewards, pass_at_k

SAMPLES = 4

REWARDS = f'''
CALLS = []

def first_c(completions, prompts, correct, **kwargs):
    """Within each group of {SAMPLES} samples the first `correct` pass."""
    CALLS.append({{"completions": completions, "prompts": prompts, "correct": correct, "kwargs": sorted(kwargs)}})
    return [1.0 if j % {SAMPLES} < c else 0.0 for j, c in enumerate(correct)]

def short(completions, **kwargs):
    return [0.25 for _ in completions]

def length(completions, **kwargs):
    return [float(len(c)) for c in completions]
'''


@pytest.fixture
def reward_module(tmp_path: Path) -> Iterator[Path]:
    """A user reward module beside the "recipe" (tmp_path), forgotten again afterwards."""
    (tmp_path / "eval_rewards_mod.py").write_text(REWARDS)
    yield tmp_path
    sys.modules.pop("eval_rewards_mod", None)


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_pass_k_may_not_exceed_the_samples() -> None:
    with pytest.raises(ValidationError, match="pass_k 5 exceeds samples 4"):
        EvaluateSpec(samples=4, pass_k=5)


def test_prompt_answer_rows_are_not_exact_match_examples() -> None:
    """GRPO rows (prompt + answer) used to raise KeyError('completion'); they are skipped there now."""
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}]
    assert to_examples(rows, tokenizer=None) == []


def test_rewards_are_called_like_trl_and_pass_at_k_counts_per_prompt(reward_module: Path) -> None:
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(reward_module / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    method = GRPOMethod(
        rewards=[
            RewardSpec(name="eval_rewards_mod:first_c", field="correct", weight=1.0),
            RewardSpec(name="eval_rewards_mod:short", weight=2.0),
        ],
        max_completion_length=6,
        temperature=1.0,
    )
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "correct": c, "answer": str(i + 1)}
        for i, c in enumerate([0, 1, 4])
    ] + [{"messages": [{"role": "user", "content": "no prompt field"}]}]
    spec = EvaluateSpec(samples=SAMPLES, pass_k=2, batch_size=8)

    metrics = evaluate_rewards(model, tokenizer, rows, spec, method, search_path=reward_module)

    module = importlib.import_module("eval_rewards_mod")  # already imported by the evaluation
    (call,) = module.CALLS
    assert len(call["completions"]) == 3 * SAMPLES
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in call["completions"])
    assert call["correct"] == [0] * SAMPLES + [1] * SAMPLES + [4] * SAMPLES  # columns repeated per sample
    assert call["prompts"][SAMPLES] == rows[1]["prompt"]
    assert call["kwargs"] == ["answer"]
    assert metrics["reward_first_c"] == pytest.approx((0 + 1 + 4) / 12)
    assert metrics["reward_short"] == pytest.approx(0.25)
    assert metrics["reward"] == pytest.approx((0 + 1 + 4) / 12 + 2 * 0.25)
    assert metrics["pass_at_1"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert metrics["pass_at_2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert set(metrics) == {"reward", "reward_first_c", "reward_short", "pass_at_1", "pass_at_2"}


def test_without_a_verifiable_reward_there_is_no_pass_at_k(reward_module: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(reward_module / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    method = GRPOMethod(rewards=[RewardSpec(name="eval_rewards_mod:length")], max_completion_length=8)
    rows = [{"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 2 =", "answer": "4"}]
    seeded = [evaluate_rewards(model, tokenizer, rows, EvaluateSpec(samples=4, pass_k=2, seed=s), method,
                               search_path=reward_module) for s in (0, 0, 1)]
    assert set(seeded[0]) == {"reward", "reward_length"} and seeded[0]["reward"] > 0  # plain-text completions
    assert seeded[0] == seeded[1]  # seeded: a version and its base draw alike
    assert seeded[0] != seeded[2]
