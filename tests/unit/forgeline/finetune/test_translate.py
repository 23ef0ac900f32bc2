"""build_train_job: an OpenAI fine-tuning request + a stored base model + uploaded files → a TrainJob."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgeline.finetune.base_models import BaseModelRecord, BaseModelStore
from forgeline.finetune.formats import inspect_jsonl
from forgeline.finetune.protocol import CreateJobRequest
from forgeline.finetune.translate import JOB_TAG, Inputs, build_train_job, registered_name
from registry.errors import ErrorCode, ForgelineError
from tests.conftest import TINY_BASE
from training.config import DistributedSpec, DPOMethod, GRPOMethod, RewardSpec, SFTMethod
from training.job import TrainJob

JOB_ID = "ftjob-0123456789abcdef01234567"


def chat_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Route tickets."},
                {"role": "user", "content": f"ticket {i}", "name": "u"},
                {"role": "assistant", "content": "billing", "weight": 1},
            ]
        }
        for i in range(n)
    ]


def preference_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"ticket {i}"}]},
            "preferred_output": [{"role": "assistant", "content": "billing"}],
            "non_preferred_output": [{"role": "assistant", "content": "shipping"}],
        }
        for i in range(n)
    ]


def prompt_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1), "level": "easy"}
        for i in range(n)
    ]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def add_base(**train: Any) -> BaseModelRecord:
    store = BaseModelStore()
    try:
        record = store.add(
            "tiny",
            str(TINY_BASE),
            actor="ops",
            adapter={"kind": "lora", "r": 8, "alpha": 16},
            train=train,
            replace=True,
        )
        assert store.get("tiny") == record
        return record
    finally:
        store.dispose()


@pytest.fixture
def base() -> BaseModelRecord:
    return add_base(learning_rate=0.002, logging_steps=5, max_length=128, batch_size=16)


def build(
    request: dict[str, Any],
    base: BaseModelRecord,
    tmp_path: Path,
    train: Path,
    validation: Path | None = None,
    *,
    job_id: str = JOB_ID,
    org: str = "acme",
    seed: int = 7,
) -> tuple[TrainJob, dict[str, Any]]:
    body = {"model": "tiny", "training_file": "file-train"} | request
    if validation is not None:
        body["validation_file"] = "file-valid"
    inputs = Inputs(
        train_path=train,
        train_summary=inspect_jsonl(train),
        validation_path=validation,
        validation_summary=inspect_jsonl(validation) if validation else None,
    )
    return build_train_job(
        CreateJobRequest.model_validate(body),
        job_id=job_id,
        org=org,
        actor="tess",
        seed=seed,
        base=base,
        inputs=inputs,
        job_root=tmp_path / "root" / job_id,
        distributed=DistributedSpec(),
        experiment="fine-tuning",
    )


def refused(param: str, *args: Any, **kwargs: Any) -> ForgelineError:
    with pytest.raises(ForgelineError) as info:
        build(*args, **kwargs)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.param == param, str(info.value)
    return info.value


# -- methods --------------------------------------------------------------------------------------


def test_supervised_writes_converted_rows_and_the_validation_file(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", chat_rows(40))
    valid = write(tmp_path / "valid.jsonl", chat_rows(4))
    job, hp = build({"suffix": "support"}, base, tmp_path, train, valid)

    assert isinstance(job.method, SFTMethod)
    data_dir = tmp_path / "root" / JOB_ID / "data"
    assert job.data.train == str(data_dir / "train.jsonl") and job.data.eval == str(data_dir / "eval.jsonl")
    rows = read(data_dir / "train.jsonl")
    assert len(rows) == 40
    assert rows[3] == {
        "prompt": [{"role": "system", "content": "Route tickets."}, {"role": "user", "content": "ticket 3"}],
        "completion": [{"role": "assistant", "content": "billing"}],
    }
    assert len(read(data_dir / "eval.jsonl")) == 4
    assert job.output_dir == str(tmp_path / "root" / JOB_ID / "output")
    assert job.model.base == str(TINY_BASE) and job.adapter.r == 8 and job.adapter.alpha == 16
    assert (job.actor, job.experiment, job.train.seed) == ("tess", "fine-tuning", 7)
    assert set(hp) == {"n_epochs", "batch_size", "learning_rate_multiplier"}


def test_without_a_validation_file_no_eval_rows_are_written(base: BaseModelRecord, tmp_path: Path) -> None:
    job, _ = build({}, base, tmp_path, write(tmp_path / "train.jsonl", chat_rows(12)))
    assert job.data.eval is None  # the trainer holds out eval_fraction of train instead
    assert not (tmp_path / "root" / JOB_ID / "data" / "eval.jsonl").exists()


def test_dpo_gets_preference_rows_and_beta(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "prefs.jsonl", preference_rows(20))
    job, hp = build({"method": {"type": "dpo"}}, base, tmp_path, train)
    assert isinstance(job.method, DPOMethod) and job.method.beta == 0.1 and hp["beta"] == 0.1
    rows = read(Path(job.data.train))
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "ticket 0"}],
        "chosen": [{"role": "assistant", "content": "billing"}],
        "rejected": [{"role": "assistant", "content": "shipping"}],
    }

    given, hp = build({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5}}}}, base, tmp_path, train)
    assert isinstance(given.method, DPOMethod) and given.method.beta == 0.5 and hp["beta"] == 0.5


def test_a_file_that_does_not_fit_the_method_is_refused(base: BaseModelRecord, tmp_path: Path) -> None:
    chat = write(tmp_path / "chat.jsonl", chat_rows(20))
    err = refused("training_file", {"method": {"type": "dpo"}}, base, tmp_path, chat)
    assert "preference" in str(err)
    prefs = write(tmp_path / "prefs.jsonl", preference_rows(20))
    err = refused("validation_file", {}, base, tmp_path, chat, prefs)
    assert str(err).startswith("validation_file:")


def test_reinforcement_with_string_check_becomes_grpo(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "prompts.jsonl", prompt_rows(40))
    grader = {
        "type": "string_check",
        "name": "m",
        "input": "{{sample.output_text}}",
        "reference": "{{item.level}}",
        "operation": "eq",
    }
    job, hp = build(
        {
            "method": {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": grader,
                    "hyperparameters": {
                        "compute_multiplier": 0.5,
                        "reasoning_effort": "high",
                        "eval_interval": 5,
                        "eval_samples": 8,
                    },
                },
            }
        },
        base,
        tmp_path,
        train,
    )

    assert isinstance(job.method, GRPOMethod)
    assert job.method.rewards == [RewardSpec(name="exact_match", field="level")]
    assert job.method.num_generations == 4 and job.method.max_completion_length == 1024
    assert hp["n_epochs"] == 1  # auto: one pass, each prompt is sampled many times
    assert (job.train.eval_steps, job.train.eval_samples) == (5, 8)
    assert read(Path(job.data.train))[2] == {
        "prompt": [{"role": "user", "content": "What is 2 + 1?"}],
        "answer": "3",
        "level": "easy",
    }


@pytest.mark.parametrize(("effort", "tokens"), [("low", 256), ("default", 512), ("medium", 512), ("high", 1024)])
@pytest.mark.parametrize(("multiplier", "generations"), [("auto", 8), (0.25, 2), (0.1, 2), (2.0, 16)])
def test_reinforcement_compute_and_effort(
    base: BaseModelRecord, tmp_path: Path, effort: str, tokens: int, multiplier: object, generations: int
) -> None:
    train = write(tmp_path / "prompts.jsonl", prompt_rows(16))
    grader = {"type": "string_check", "reference": "{{item.answer}}", "operation": "ilike"}
    job, _ = build(
        {
            "method": {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": grader,
                    "hyperparameters": {"compute_multiplier": multiplier, "reasoning_effort": effort},
                },
            }
        },
        base,
        tmp_path,
        train,
    )
    assert isinstance(job.method, GRPOMethod)
    assert (job.method.num_generations, job.method.max_completion_length) == (generations, tokens)


def test_a_grader_reading_a_missing_field_is_refused(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "prompts.jsonl", prompt_rows(16))
    grader = {"type": "string_check", "reference": "{{item.reference_answer}}", "operation": "eq"}
    err = refused(
        "method.reinforcement.grader",
        {"method": {"type": "reinforcement", "reinforcement": {"grader": grader}}},
        base,
        tmp_path,
        train,
    )
    assert "'reference_answer'" in str(err) and "answer, level" in str(err)


def test_a_batch_that_does_not_hold_whole_groups_is_refused_before_queueing(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "prompts.jsonl", prompt_rows(16))
    grader = {"type": "string_check", "reference": "{{item.answer}}", "operation": "eq"}
    hyper = {"batch_size": 8, "compute_multiplier": 0.375}  # 3 completions per prompt: 8 is not a multiple
    err = refused(
        "hyperparameters",
        {"method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}}},
        base,
        tmp_path,
        train,
    )
    assert "num_generations" in str(err) and "(8)" in str(err)


# -- auto hyper-parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "epochs"), [(12, 10), (100, 10), (101, 10), (150, 7), (400, 3), (1000, 1), (2500, 1)])
def test_auto_epochs_show_about_a_thousand_examples(
    base: BaseModelRecord, tmp_path: Path, rows: int, epochs: int
) -> None:
    job, hp = build({}, base, tmp_path, write(tmp_path / "train.jsonl", chat_rows(rows)))
    assert hp["n_epochs"] == epochs and job.train.epochs == epochs
    assert job.train.max_steps == -1 and job.train.resume == "auto"


def test_auto_batch_size_is_the_base_default_at_most_the_rows(base: BaseModelRecord, tmp_path: Path) -> None:
    job, hp = build({}, base, tmp_path, write(tmp_path / "many.jsonl", chat_rows(40)))
    assert hp["batch_size"] == job.train.batch_size == 16  # the base model's train.batch_size
    job, hp = build({}, base, tmp_path, write(tmp_path / "few.jsonl", chat_rows(12)))
    assert hp["batch_size"] == job.train.batch_size == 12
    plain = add_base()
    job, hp = build({}, plain, tmp_path, write(tmp_path / "many.jsonl", chat_rows(40)))
    assert hp["batch_size"] == job.train.batch_size == 8  # TrainSpec's default when the operator set none
    assert job.train.learning_rate == pytest.approx(2e-4)


def test_given_hyperparameters_win(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", chat_rows(40))
    job, hp = build(
        {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2}}, base, tmp_path, train
    )
    assert hp == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert (job.train.epochs, job.train.batch_size) == (3, 4)
    assert job.train.learning_rate == pytest.approx(0.004)  # base 0.002 x 2


def test_auto_learning_rate_and_base_defaults_carry_over(base: BaseModelRecord, tmp_path: Path) -> None:
    job, hp = build({}, base, tmp_path, write(tmp_path / "train.jsonl", chat_rows(40)))
    assert hp["learning_rate_multiplier"] == 1.0
    assert job.train.learning_rate == pytest.approx(0.002)
    assert (job.train.logging_steps, job.train.max_length) == (5, 128)


def test_a_multiplier_pushing_the_learning_rate_to_one_is_refused(tmp_path: Path) -> None:
    base = add_base(learning_rate=0.2)
    train = write(tmp_path / "train.jsonl", chat_rows(40))
    err = refused("hyperparameters", {"hyperparameters": {"learning_rate_multiplier": 5}}, base, tmp_path, train)
    assert "learning_rate" in str(err) and "fix:" in str(err)
    job, _ = build({"hyperparameters": {"learning_rate_multiplier": 4}}, base, tmp_path, train)
    assert job.train.learning_rate == pytest.approx(0.8)


def test_fewer_than_ten_rows_need_a_validation_file(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", chat_rows(9))
    err = refused("training_file", {}, base, tmp_path, train)
    assert "9 rows" in str(err) and "validation_file" in str(err)
    job, hp = build({}, base, tmp_path, train, write(tmp_path / "valid.jsonl", chat_rows(3)))
    assert job.data.eval is not None and hp["batch_size"] == 9


# -- names, tags, hashes ---------------------------------------------------------------------------


def test_registered_name() -> None:
    assert registered_name("acme", "tiny", "support", JOB_ID) == "ft-acme-tiny-support"
    assert registered_name("acme", "tiny", None, JOB_ID) == "ft-acme-tiny-01234567"
    assert registered_name("Acme Corp/EU", "tiny", "x", JOB_ID) == "ft-acme-corp-eu-tiny-x"
    assert registered_name("///", "tiny", "x", JOB_ID) == "ft-org-tiny-x"


def test_the_job_is_named_and_tagged(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", chat_rows(12))
    job, _ = build({"suffix": "legal-v2"}, base, tmp_path, train)
    assert job.name == "ft-acme-tiny-legal-v2"
    assert job.run_tags == {JOB_TAG: JOB_ID, "forgeline.org": "acme", "forgeline.base_model_name": "tiny"}
    unnamed, _ = build({}, base, tmp_path, train)
    assert unnamed.name == "ft-acme-tiny-01234567"


def test_recipe_hash_is_stable_per_job(base: BaseModelRecord, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", chat_rows(12))
    first, _ = build({"suffix": "a"}, base, tmp_path, train)
    again, _ = build({"suffix": "a"}, base, tmp_path, train)
    other_job, _ = build({"suffix": "a"}, base, tmp_path, train, job_id="ftjob-ffffffffffffffffffffffff")
    other_seed, _ = build({"suffix": "a"}, base, tmp_path, train, seed=8)
    other_request, _ = build({"suffix": "b"}, base, tmp_path, train)
    assert first.recipe_hash == again.recipe_hash
    assert len({first.recipe_hash, other_job.recipe_hash, other_seed.recipe_hash, other_request.recipe_hash}) == 4
