"""Wire models of the fine-tuning jobs API: request validation and the OpenAI response shapes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from pydantic import ValidationError

from forgeline.finetune.jobs import EventRow, JobRow
from forgeline.finetune.protocol import (
    CreateJobRequest,
    DpoHyperparameters,
    Hyperparameters,
    Method,
    ReinforcementHyperparameters,
    event_object,
    job_object,
    page,
)

BASE = {"model": "tiny", "training_file": "file-abc"}
GRADER = {
    "type": "string_check",
    "name": "m",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
CREATED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)


def bad(body: dict[str, Any], *words: str) -> str:
    with pytest.raises(ValidationError) as info:
        CreateJobRequest.model_validate(BASE | body)
    text = str(info.value)
    for word in words:
        assert word in text, text
    return text


# -- requests -------------------------------------------------------------------------------------


def test_the_smallest_request_is_supervised_with_auto_everything() -> None:
    request = CreateJobRequest.model_validate(BASE)
    method = request.resolved_method()
    assert method.type == "supervised"
    assert method.hyperparameters() == Hyperparameters(
        n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto"
    )


@pytest.mark.parametrize("field", ["n_epoch", "training_files", "user", "prompt_loss_weight"])
def test_unknown_fields_are_refused_by_name(field: str) -> None:
    bad({field: 1}, field, "Extra inputs are not permitted")


def test_unknown_fields_inside_the_method_are_refused() -> None:
    bad(
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "epochs": 3}}}},
        "method.supervised.hyperparameters.epochs",
    )
    bad({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}, "loss": "ipo"}}}, "method.dpo.loss")


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": 51}, "n_epochs"),
        ({"n_epochs": "many"}, "n_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 257}, "batch_size"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": -1.0}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": 10.5}, "learning_rate_multiplier"),
    ],
)
def test_hyperparameter_ranges(hyperparameters: dict[str, Any], field: str) -> None:
    bad({"hyperparameters": hyperparameters}, field)
    bad({"method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}, field)


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"n_epochs": 1},
        {"n_epochs": 50},
        {"batch_size": 1},
        {"batch_size": 256},
        {"learning_rate_multiplier": 10},
        {"learning_rate_multiplier": 0.01},
        {"n_epochs": "auto"},
    ],
)
def test_hyperparameter_range_edges_are_accepted(hyperparameters: dict[str, Any]) -> None:
    hp = (
        CreateJobRequest.model_validate(BASE | {"hyperparameters": hyperparameters}).resolved_method().hyperparameters()
    )
    assert hp.model_dump(exclude_defaults=True) == {k: v for k, v in hyperparameters.items() if v != "auto"}


@pytest.mark.parametrize("beta", [0, -0.1, 2.5])
def test_dpo_beta_range(beta: float) -> None:
    bad({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}}}, "beta")


def test_dpo_and_reinforcement_hyperparameters() -> None:
    dpo = CreateJobRequest.model_validate(BASE | {"method": {"type": "dpo"}}).resolved_method()
    assert isinstance(dpo.hyperparameters(), DpoHyperparameters) and dpo.hyperparameters().beta == "auto"
    given = {"n_epochs": 2, "compute_multiplier": 0.5, "eval_interval": 3, "eval_samples": 9, "reasoning_effort": "low"}
    rl = CreateJobRequest.model_validate(
        BASE | {"method": {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": given}}}
    ).resolved_method()
    hp = rl.hyperparameters()
    assert isinstance(hp, ReinforcementHyperparameters) and hp.model_dump(exclude_defaults=True) == given
    bad(
        {
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"reasoning_effort": "extreme"}},
            }
        },
        "reasoning_effort",
    )
    bad({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}, "beta")


@pytest.mark.parametrize("suffix", ["legal-v2", "a", "0", "x" * 40, "a-b-c-1"])
def test_good_suffixes(suffix: str) -> None:
    assert CreateJobRequest.model_validate(BASE | {"suffix": suffix}).suffix == suffix


@pytest.mark.parametrize("suffix", ["", "Legal", "legal_v2", "-legal", "x" * 41, "a/b", "a:b", "a@b", "a b"])
def test_bad_suffixes_name_the_rule(suffix: str) -> None:
    bad({"suffix": suffix}, "suffix", "lower-case letters, digits and dashes")


def test_method_section_must_match_its_type() -> None:
    bad(
        {"method": {"type": "dpo", "supervised": {}}},
        "method.type is 'dpo' but method.supervised is set",
        "remove method.supervised",
    )
    bad({"method": {"type": "supervised", "reinforcement": {"grader": GRADER}}}, "method.reinforcement is set")
    bad({"method": {"type": "reinforcement"}}, "needs method.reinforcement.grader")
    bad({"method": {"type": "reinforcement", "reinforcement": {}}}, "grader", "Field required")
    bad({"method": {"type": "sft"}}, "method.type")


def test_hyperparameters_in_two_places_are_refused() -> None:
    bad(
        {"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised"}},
        "method.<type>.hyperparameters only, not also at the top level",
    )


def test_legacy_top_level_hyperparameters_become_supervised() -> None:
    request = CreateJobRequest.model_validate(BASE | {"hyperparameters": {"n_epochs": 4, "batch_size": 2}})
    method = request.resolved_method()
    assert method.type == "supervised" and method.supervised is not None
    assert (method.hyperparameters().n_epochs, method.hyperparameters().batch_size) == (4, 2)
    assert method.hyperparameters().learning_rate_multiplier == "auto"


def test_method_without_its_section_uses_auto() -> None:
    assert Method(type="supervised").hyperparameters() == Hyperparameters()
    assert Method(type="dpo").hyperparameters() == DpoHyperparameters()


def test_metadata_limits() -> None:
    ok = {f"k{i}": "v" for i in range(16)}
    assert CreateJobRequest.model_validate(BASE | {"metadata": ok}).metadata == ok
    assert CreateJobRequest.model_validate(BASE | {"metadata": {"k" * 64: "v" * 512}}).metadata
    bad({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16 pairs")
    bad({"metadata": {"k" * 65: "v"}}, "keys up to 64")
    bad({"metadata": {"k": "v" * 513}}, "values up to 512")
    bad({"metadata": {"k": 3}}, "metadata.k")


def test_seed_integrations_and_required_fields() -> None:
    bad({"seed": -1}, "seed")
    bad({"seed": 2**31}, "seed")
    bad({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations.0.type")
    request = CreateJobRequest.model_validate(
        BASE | {"integrations": [{"type": "mlflow", "mlflow": {"experiment": "legal"}}]}
    )
    assert request.integrations is not None and request.integrations[0].mlflow.experiment == "legal"
    with pytest.raises(ValidationError, match="training_file"):
        CreateJobRequest.model_validate({"model": "tiny"})
    with pytest.raises(ValidationError, match="model"):
        CreateJobRequest.model_validate({"model": "", "training_file": "file-abc"})


# -- responses ------------------------------------------------------------------------------------


def job_row(**changes: Any) -> JobRow:
    row = JobRow(
        id="ftjob-0123456789abcdef01234567",
        org="acme",
        created_by="tess",
        model="tiny",
        training_file="file-train",
        validation_file="file-valid",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}},
        },
        hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
        suffix="support",
        seed=7,
        integrations=[],
        metadata={"team": "support"},
        status="queued",
        registered_name="ft-acme-tiny-support",
        fine_tuned_model=None,
        version=None,
        run_id=None,
        attempt=1,
        launcher_job_id=None,
        train_job={},
        cluster={},
        error=None,
        trained_tokens=None,
        created_at=CREATED,
        updated_at=CREATED,
        finished_at=None,
    )
    return replace(row, **changes)


def test_a_queued_job_in_openai_shape() -> None:
    body = job_object(job_row())
    assert body["object"] == "fine_tuning.job" and body["created_at"] == int(CREATED.timestamp()) == 1772366400
    assert body["finished_at"] is None and body["fine_tuned_model"] is None and body["integrations"] is None
    assert body["organization_id"] == "acme" and body["user_provided_suffix"] == "support"
    assert body["forgeline"] == {
        "registered_model": "ft-acme-tiny-support",
        "version": None,
        "run_id": None,
        "attempt": 1,
        "launcher_job_id": None,
    }

    job = FineTuningJob.model_validate(body)
    assert (job.id, job.status, job.model, job.seed) == ("ftjob-0123456789abcdef01234567", "queued", "tiny", 7)
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None and job.method.supervised.hyperparameters.batch_size == 8
    assert (job.training_file, job.validation_file, job.metadata) == ("file-train", "file-valid", {"team": "support"})
    assert job.result_files == [] and job.trained_tokens is None


def test_a_finished_job_reports_its_model_and_unix_times() -> None:
    body = job_object(
        job_row(
            status="succeeded", fine_tuned_model="ft-acme-tiny-support", version=2, run_id="r1", finished_at=FINISHED
        )
    )
    job = FineTuningJob.model_validate(body)
    assert job.finished_at == int(FINISHED.timestamp()) and job.finished_at - job.created_at == 30 * 60 + 5
    assert job.fine_tuned_model == "ft-acme-tiny-support" and body["forgeline"]["version"] == 2


def test_a_failed_job_carries_openai_error() -> None:
    error = {"code": "training_failed", "message": "training failed (exit 1)", "param": None}
    job = FineTuningJob.model_validate(job_object(job_row(status="failed", error=error, finished_at=FINISHED)))
    assert job.error is not None and (job.error.code, job.error.message) == (
        "training_failed",
        "training failed (exit 1)",
    )


def test_dpo_and_reinforcement_jobs_parse_in_the_sdk() -> None:
    dpo = job_row(
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0, "beta": 0.1}},
        }
    )
    assert FineTuningJob.model_validate(job_object(dpo)).method.dpo.hyperparameters.beta == 0.1  # type: ignore[union-attr]
    rl = job_row(
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": GRADER,
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 8,
                    "learning_rate_multiplier": 1.0,
                    "compute_multiplier": 0.25,
                    "eval_interval": "auto",
                    "eval_samples": "auto",
                    "reasoning_effort": "low",
                },
            },
        }
    )
    parsed = FineTuningJob.model_validate(job_object(rl)).method.reinforcement  # type: ignore[union-attr]
    assert parsed is not None and parsed.grader.type == "string_check"
    assert parsed.hyperparameters is not None and parsed.hyperparameters.compute_multiplier == 0.25


def test_events_in_openai_shape() -> None:
    rows = [
        EventRow(
            seq=1,
            id="ftevent-1",
            job_id="ftjob-x",
            key="created",
            level="info",
            type="message",
            message="Created fine-tuning job: ftjob-x",
            data=None,
            created_at=CREATED,
        ),
        EventRow(
            seq=2,
            id="ftevent-2",
            job_id="ftjob-x",
            key="train_loss-10",
            level="info",
            type="metrics",
            message="Step 10/60: training loss=1.2345",
            data={"step": 10, "train_loss": 1.2345},
            created_at=FINISHED,
        ),
        EventRow(
            seq=3,
            id="ftevent-3",
            job_id="ftjob-x",
            key="failed",
            level="error",
            type="message",
            message="Job failed",
            data=None,
            created_at=FINISHED,
        ),
    ]
    parsed = [FineTuningJobEvent.model_validate(event_object(r)) for r in rows]
    assert [(e.id, e.object, e.type, e.level) for e in parsed] == [
        ("ftevent-1", "fine_tuning.job.event", "message", "info"),
        ("ftevent-2", "fine_tuning.job.event", "metrics", "info"),
        ("ftevent-3", "fine_tuning.job.event", "message", "error"),
    ]
    assert parsed[0].created_at == int(CREATED.timestamp()) and parsed[1].data == {"step": 10, "train_loss": 1.2345}


def test_pages() -> None:
    items = [{"id": "a"}, {"id": "b"}]
    assert page(items, True) == {"object": "list", "data": items, "has_more": True, "first_id": "a", "last_id": "b"}
    assert page([], False) == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
