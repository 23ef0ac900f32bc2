"""What the supervisor does with the versions fine-tuning jobs register, beyond LoRA SFT.

A job on a base whose operator defaults are a full fine-tune (``adapter: {kind: none}``) is
evaluated against the base, built from its own weights, moved to ``@candidate`` and served by
name. A reinforcement job is evaluated with its grader as the reward: pass@k on the validation file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.control import create_control_app
from forgeline.finetune.base_models import BaseModelStore
from forgeline.finetune.service import FineTuningSettings
from registry import lineage
from registry.client import Registry
from serving.artifacts.torch_build import load_manifest
from serving.config import ServeSpec
from serving.gateway.server import serve_in_background
from serving.registry_models import local_artifact_dir
from serving.service import build_gateway
from tests.conftest import REPO, SUPPORT_DATA, TINY_BASE
from tests.support.finetune_client import TINY_TRAIN_DEFAULTS, Org, all_events, chat_file
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Route this ticket: my card was charged twice."}]
ARITHMETIC = REPO / "recipes" / "data" / "toy-arithmetic"


@pytest.fixture
def plane(org: Org) -> Iterator[str]:
    BaseModelStore().add("tiny-full", str(TINY_BASE), actor="ops", adapter={"kind": "none"},
                         train={**TINY_TRAIN_DEFAULTS, "learning_rate": 0.0005})
    url, stop = serve_in_background(create_control_app(fine_tuning=FineTuningSettings(poll_interval_s=0.5)))
    try:
        yield url
    finally:
        stop()


def test_a_full_fine_tuning_job_is_evaluated_built_and_served_by_name(plane: str, org: Org, tmp_path: Path) -> None:
    tess = org.client(plane, "tess")
    train = tess.files.create(file=chat_file(tmp_path / "train.jsonl", SUPPORT_DATA / "train.jsonl", 64).open("rb"),
                              purpose="fine-tune")
    valid = tess.files.create(file=chat_file(tmp_path / "valid.jsonl", SUPPORT_DATA / "eval.jsonl", 16).open("rb"),
                              purpose="fine-tune")
    job = tess.fine_tuning.jobs.create(
        model="tiny-full", training_file=train.id, validation_file=valid.id, suffix="full",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}},
    )
    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    messages = [e.message for e in all_events(tess, job.id)]
    assert any(m.startswith("Evaluated on the validation file: accuracy=") for m in messages), messages
    assert f"Serving artifact built (torch engine) for {name} version 1" in messages, messages
    assert f"{name} version 1 is now {name}@candidate" in messages

    registry = Registry()
    info = registry.get_version(name, 1)
    assert lineage.is_full_fine_tune(info.tags)
    assert info.metrics()["eval_loss"] < info.base_metrics()["eval_loss"]  # scored against the tiny base checkpoint
    manifest = load_manifest(local_artifact_dir(info.tags[lineage.engine_tag("torch")], info, "torch"))
    assert manifest.full_weights is not None and manifest.adapter is None

    gateway, stop = serve_in_background(build_gateway(registry, [f"{name}@candidate"], ServeSpec(port=0, poll_interval_s=0)))
    try:
        raw = org.client(gateway, "tess").chat.completions.with_raw_response.create(
            model=f"{name}@candidate", messages=QUESTION, max_tokens=8, temperature=0
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-forgeline-model-version"].endswith("/1")
    finally:
        stop()
        registry.close()


def _prompt_file(path: Path, source: Path, rows: int) -> Path:
    """OpenAI reinforcement rows (``messages`` ending with the user, plus the reference ``answer``)."""
    rows_in = [json.loads(line) for line in source.read_text().splitlines()[:rows]]
    path.write_text("".join(json.dumps({"messages": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows_in))
    return path


def test_a_reinforcement_job_is_evaluated_with_its_grader_as_the_reward(plane: str, org: Org, tmp_path: Path) -> None:
    tess = org.client(plane, "tess")
    train = tess.files.create(file=_prompt_file(tmp_path / "train.jsonl", ARITHMETIC / "train.jsonl", 16).open("rb"),
                              purpose="fine-tune")
    valid = tess.files.create(file=_prompt_file(tmp_path / "valid.jsonl", ARITHMETIC / "eval.jsonl", 8).open("rb"),
                              purpose="fine-tune")
    grader = {"type": "string_check", "name": "answer", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "eq"}
    job = tess.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="sums",
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "n_epochs": 1, "batch_size": 8, "compute_multiplier": 0.25, "reasoning_effort": "low"}}},
    )
    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    evaluated = [e for e in all_events(tess, job.id) if e.message.startswith("Evaluated on the validation file")]
    assert len(evaluated) == 1, [e.message for e in all_events(tess, job.id)]
    metrics = evaluated[0].data["metrics"]  # type: ignore[index]
    assert set(metrics) == {"reward", "reward_exact_match", "pass_at_1", "pass_at_4"}
    assert set(evaluated[0].data["base_metrics"]) == set(metrics)  # type: ignore[index]
    info = Registry().get_version(done.fine_tuned_model, 1)
    assert info.metrics() == pytest.approx(metrics)  # recorded on the version, for the policy gates


def test_a_tool_use_job_reports_tool_call_metrics_in_its_events(plane: str, org: Org, tmp_path: Path) -> None:
    tools_data = REPO / "recipes" / "data" / "tool-use"
    BaseModelStore().add("tiny-tools", str(TINY_BASE), actor="ops", adapter={"kind": "lora", "r": 16, "alpha": 32},
                         chat_template=(REPO / "recipes" / "templates" / "tiny-tools.jinja").read_text(),
                         train={**TINY_TRAIN_DEFAULTS, "max_length": 256})  # tool conversations run ~150 tokens
    tess = org.client(plane, "tess")

    def upload(name: str, source: Path, rows: int) -> str:
        path = tmp_path / name
        path.write_text("\n".join(source.read_text().splitlines()[:rows]) + "\n")  # OpenAI's format, tools and all
        return tess.files.create(file=path.open("rb"), purpose="fine-tune").id

    job = tess.fine_tuning.jobs.create(
        model="tiny-tools", training_file=upload("train.jsonl", tools_data / "train.jsonl", 32),
        validation_file=upload("valid.jsonl", tools_data / "eval.jsonl", 4), suffix="tools",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}},
    )
    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    evaluated = [e for e in all_events(tess, job.id) if e.message.startswith("Evaluated on the validation file")]
    assert len(evaluated) == 1, [e.message for e in all_events(tess, job.id)]
    metrics = evaluated[0].data["metrics"]  # type: ignore[index]
    assert {"tool_call_accuracy", "schema_valid_rate", "final_answer_exact_match"} <= set(metrics)
    assert set(evaluated[0].data["base_metrics"]) == set(metrics)  # type: ignore[index]
    assert Registry().get_version(done.fine_tuned_model, 1).metrics() == pytest.approx(metrics)
