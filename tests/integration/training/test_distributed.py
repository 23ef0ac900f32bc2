"""Two processes under torchrun (gloo on CPU): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each must produce an adapter that loads, one MLflow run and exactly one registered
version: only rank 0 talks to MLflow and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from forgeline import pipeline
from forgeline.recipe import load_recipe
from registry.client import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRATEGIES = {
    "ddp": {"strategy": "ddp", "nproc": 2},
    "zero2": {"strategy": "deepspeed", "nproc": 2, "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "nproc": 2, "zero_stage": 3},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_make_one_run_one_version_and_a_loadable_adapter(
    strategy: str, tiny_recipe: Callable[..., Path], extensions_cache: None
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_recipe(
        "sft-lora",
        train={"max_steps": 4, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "eval_steps": None, "best_metric": None},
        distributed=STRATEGIES[strategy],
    )
    recipe = load_recipe(path)
    registry = Registry()
    result = pipeline.train(recipe, path, registry=registry)

    assert [v.version for v in registry.list_versions("tiny-sft")] == [1]
    experiment = registry.client.get_experiment_by_name("forgeline")
    runs = registry.client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    loss = registry.client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4]  # logged once per step, by rank 0 only

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.base), str(result.adapter_dir))
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at zero: it trained

    state = json.loads((result.adapter_dir.parent / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    if strategy != "ddp":
        config = json.loads((result.adapter_dir.parent / "deepspeed.json").read_text())
        assert config["zero_optimization"]["stage"] == STRATEGIES[strategy]["zero_stage"]
        assert any(p.name.startswith("global_step") for p in (result.adapter_dir.parent / "checkpoints" / "checkpoint-4").iterdir())
