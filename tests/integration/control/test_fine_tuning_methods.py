"""DPO and reinforcement fine-tuning jobs end to end through the stock ``openai`` SDK against a
control plane on loopback: OpenAI preference / prompt files → a job → training-loss events →
succeeded → a registered version whose lineage says which method trained it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from forgeline.control import create_control_app
from forgeline.finetune.service import FineTuningSettings
from registry import lineage
from registry.client import Registry
from serving.gateway.server import serve_in_background
from tests.conftest import REPO
from tests.support.finetune_client import Org, all_events
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFERENCES = REPO / "recipes" / "data" / "support-preferences" / "train.jsonl"
ARITHMETIC = REPO / "recipes" / "data" / "toy-arithmetic" / "train.jsonl"


def preference_file(path: Path, rows: int) -> Path:
    """OpenAI preference rows from the shipped TRL rows (``prompt``/``chosen``/``rejected``)."""
    source = [json.loads(line) for line in PREFERENCES.read_text().splitlines()[:rows]]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "input": {"messages": r["prompt"]},
                    "preferred_output": r["chosen"],
                    "non_preferred_output": r["rejected"],
                }
            )
            + "\n"
            for r in source
        )
    )
    return path


def prompt_file(path: Path, rows: int) -> Path:
    """OpenAI reinforcement prompt rows (``messages`` ending with the user, plus the reference ``answer``)."""
    source = [json.loads(line) for line in ARITHMETIC.read_text().splitlines()[:rows]]
    path.write_text("".join(json.dumps({"messages": r["prompt"], "answer": r["answer"]}) + "\n" for r in source))
    return path


@pytest.fixture
def plane(org: Org) -> Iterator[str]:
    app = create_control_app(fine_tuning=FineTuningSettings(poll_interval_s=0.5, evaluate=False, build=False))
    url, stop = serve_in_background(app)
    try:
        yield url
    finally:
        stop()


def _finished(client: openai.OpenAI, job_id: str) -> object:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.finished_at else None


def _loss_events(client: openai.OpenAI, job_id: str) -> list[openai.types.fine_tuning.FineTuningJobEvent]:
    return [e for e in all_events(client, job_id) if e.type == "metrics" and e.data and "train_loss" in e.data]


def _method_tag(name: str, version: int) -> str:
    registry = Registry()
    try:
        return registry.get_version(name, version).tags[lineage.METHOD]
    finally:
        registry.close()


def test_a_dpo_job_trains_and_registers_a_dpo_version(plane: str, org: Org, tmp_path: Path) -> None:
    started = time.monotonic()
    tess = org.client(plane, "tess")
    train = tess.files.create(file=preference_file(tmp_path / "prefs.jsonl", 64).open("rb"), purpose="fine-tune")

    job = tess.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        suffix="prefs",
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
    )
    assert job.status == "queued"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1  # "auto" resolved and reported

    done = wait_for("the dpo job to finish", lambda: _finished(tess, job.id), timeout_s=600)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-acme-tiny-prefs"
    messages = [e.message for e in all_events(tess, job.id)]
    assert messages[-1] == "The job has successfully completed"
    assert any(m.startswith("New fine-tuned model created: ft-acme-tiny-prefs version 1") for m in messages)
    losses = _loss_events(tess, job.id)
    assert losses, f"no training-loss events in {messages}"
    assert all(isinstance(e.data["train_loss"], float) for e in losses)
    assert _method_tag(done.fine_tuned_model, 1) == "dpo"
    print(f"\ndpo job wall time: {time.monotonic() - started:.1f} s")


def test_a_reinforcement_job_trains_with_a_string_check_grader(plane: str, org: Org, tmp_path: Path) -> None:
    started = time.monotonic()
    tess = org.client(plane, "tess")
    train = tess.files.create(file=prompt_file(tmp_path / "prompts.jsonl", 32).open("rb"), purpose="fine-tune")

    job = tess.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        suffix="sums",
        seed=5,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": {
                    "type": "string_check",
                    "name": "answer",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}",
                    "operation": "eq",
                },
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 8,
                    "compute_multiplier": 0.25,
                    "reasoning_effort": "low",
                },
            },
        },
    )
    assert job.status == "queued" and job.method.type == "reinforcement"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.25

    done = wait_for("the reinforcement job to finish", lambda: _finished(tess, job.id), timeout_s=900)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-acme-tiny-sums"
    messages = [e.message for e in all_events(tess, job.id)]
    assert messages[-1] == "The job has successfully completed"
    assert _loss_events(tess, job.id), f"no training-loss events in {messages}"
    assert _method_tag(done.fine_tuned_model, 1) == "grpo"
    print(f"\nreinforcement job wall time: {time.monotonic() - started:.1f} s")
