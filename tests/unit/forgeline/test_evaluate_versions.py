"""`forgeline evaluate` on GRPO versions: where the rewards come from, and bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline import pipeline
from forgeline.cli import app as cli
from registry import lineage
from registry.client import Registry
from registry.errors import ForgelineError
from tests.conftest import REPO


def test_a_grpo_version_without_a_training_run_asks_for_the_recipe() -> None:
    registry = Registry()
    registry.create_version(
        "hand-made",
        source=str(REPO / "assets" / "tiny-base"),
        run_id=None,
        tags={lineage.METHOD: "grpo", lineage.ADAPTER: "none", lineage.DATA_EVAL: "unused.jsonl"},
    )
    with pytest.raises(ForgelineError, match=r"hand-made@1 is a GRPO version .* --recipe RECIPE.yaml"):
        pipeline.evaluate(registry, "hand-made", 1)
    registry.close()


def test_pass_k_beyond_the_samples_is_one_clear_line() -> None:
    result = CliRunner().invoke(cli, ["evaluate", "any", "1", "--samples", "4", "--pass-k", "9"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # rich boxes and wraps the message
    assert "9 is not in 1..--samples (4); fix: raise --samples or lower --pass-k" in text and "Traceback" not in text


def test_rewards_that_cannot_be_imported_are_reported_before_any_weights_load(tmp_path: Path) -> None:
    from registry.errors import ConfigError
    from training.config import GRPOMethod, RewardSpec

    registry = Registry()
    registry.create_version(
        "moved-rewards",
        source=str(tmp_path / "not-even-there"),
        run_id=None,
        tags={lineage.METHOD: "grpo", lineage.ADAPTER: "none", lineage.DATA_EVAL: "unused.jsonl"},
    )
    method = GRPOMethod(rewards=[RewardSpec(name="gone_module:score")])
    with pytest.raises(ConfigError, match=r"(?s)the rewards of moved-rewards@1 has 1 problem.*method.rewards\[0\].name: cannot import module 'gone_module'"):
        pipeline.evaluate(registry, "moved-rewards", 1, method=method, search_path=tmp_path)
    registry.close()
