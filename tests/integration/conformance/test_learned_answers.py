"""A version that answers correctly through the gateway scores the same in ``forgeline evaluate``.

Llama-3-style and Gemma-2-style tiny models end their turn with a token that is not their
tokenizer's eos (``<|eot_id|>``, ``<end_of_turn>``); ``evaluate`` used to stop at the eos only,
ran past the answer and scored 0 a version the gateway served correctly. Each is LoRA-tuned
on a small routing task (`routing_task`), evaluated, promoted with the quickstart recipe's own
``promote:`` policy, built and served; every held-out prompt then goes through the stock
``openai`` SDK, and the gateway's answers must equal the predictions ``evaluate`` scored.

The bases are the family checkpoints with ``initializer_range=0.2``: at the default 0.02 a
random model's logits are nearly flat and frozen (LoRA cannot reach the output layer), so no
answer ever wins greedy decoding clearly; the sharper init lets LoRA learn in ~80 steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conformance.routing_task import write_routing_task
from tests.integration.conformance.stages import REPO, Cell, ask_raw, run_cell, served
from tests.support.families import build_family

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW_TOKENS = 8


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_evaluate_scores_what_the_gateway_answers(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.evaluation as evaluation
    from registry.client import Registry

    # Record the exact predictions evaluate scores (the version's, then its base's).
    predictions: list[list[str]] = []
    generate_answers = evaluation.generate_answers

    def recording(*args: Any, **kwargs: Any) -> list[str]:
        answers = generate_answers(*args, **kwargs)
        predictions.append(answers)
        return answers

    monkeypatch.setattr(evaluation, "generate_answers", recording)

    base = build_family(name, tmp_path_factory.mktemp("sharp"), initializer_range=0.2)
    data = write_routing_task(tmp_path / "data")
    quickstart_policy = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())["promote"]
    cell = Cell(name, "sft", "lora")
    run = run_cell(
        cell, base, tmp_path, until="build", data=data,
        overrides={
            "train": {"max_steps": 80, "learning_rate": 0.01, "batch_size": 8, "max_length": 48, "logging_steps": 10},
            "adapter": {"r": 16, "alpha": 32},
            "evaluate": {"max_samples": 64, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 8},
            "promote": quickstart_policy,
        },
    )
    # Promoted by the quickstart policy: accuracy >= 0.8, better than the base, no regression.
    assert run.promoted and run.metrics["accuracy"] >= 0.8 > run.base_metrics["accuracy"]
    version_predictions = predictions[0]

    rows = [json.loads(line) for line in Path(data["eval"]).read_text().splitlines()]
    assert len(version_predictions) == len(rows)
    with served([run.recipe.name], run.recipe.serve) as base_url:
        replies = [ask_raw(base_url, run.recipe.name, row["prompt"], max_tokens=MAX_NEW_TOKENS).parse() for row in rows]
    answers = [r.choices[0].message.content for r in replies]

    assert answers == version_predictions  # the same text, token for token, stop included
    correct = [a.strip() == row["completion"][0]["content"] for a, row in zip(answers, rows, strict=True)]
    assert sum(correct) / len(rows) == pytest.approx(Registry().get_version(run.recipe.name, run.version).metrics()["accuracy"])
    # A correct answer ended at the family's turn-end token, not at max_tokens.
    assert all(r.choices[0].finish_reason == "stop" for r, ok in zip(replies, correct, strict=True) if ok)
