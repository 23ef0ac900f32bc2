"""Reinforcement graders → GRPO rewards: what is offered, what is refused and why."""

from __future__ import annotations

from typing import Any

import pytest

from forgeline.finetune.graders import rewards_for
from registry.errors import ErrorCode, ForgelineError
from training.config import RewardSpec

FIELDS = ("answer", "level")
PARAM = "method.reinforcement.grader"


def refused(grader: dict[str, Any], param: str, fields: tuple[str, ...] = FIELDS) -> str:
    with pytest.raises(ForgelineError) as info:
        rewards_for(grader, fields)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.param == param, str(info.value)
    return str(info.value)


@pytest.mark.parametrize("operation", ["eq", "ilike"])
@pytest.mark.parametrize("reference", ["{{item.answer}}", "{{ item.answer }}"])
@pytest.mark.parametrize("answer_input", ["{{sample.output_text}}", "{{ sample.output_text }}", None])
def test_string_check_reads_the_named_field(operation: str, reference: str, answer_input: str | None) -> None:
    grader = {"type": "string_check", "name": "match", "operation": operation, "reference": reference}
    if answer_input is not None:
        grader["input"] = answer_input
    assert rewards_for(grader, FIELDS) == [RewardSpec(name="exact_match", field="answer")]


def test_string_check_on_another_field() -> None:
    grader = {"type": "string_check", "operation": "eq", "reference": "{{item.level}}"}
    (spec,) = rewards_for(grader, FIELDS)
    assert spec.reference_field() == "level"


def test_forgeline_rewards_keep_names_weights_and_fields() -> None:
    grader = {
        "type": "forgeline",
        "rewards": [
            {"name": "numeric_match", "weight": 2.0, "field": "level"},
            {"name": "r1_format", "weight": 0.5},
            {"name": "exact_match"},
            {"name": "json_valid"},
        ],
    }
    assert rewards_for(grader, FIELDS) == [
        RewardSpec(name="numeric_match", weight=2.0, field="level"),
        RewardSpec(name="r1_format", weight=0.5),
        RewardSpec(name="exact_match"),  # reads `answer` by default, which every row has
        RewardSpec(name="json_valid"),
    ]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("python", "runs code from the request"),
        ("score_model", "calls a hosted model"),
        ("label_model", "calls a hosted model"),
        ("text_similarity", "not mapped"),
        ("multi", "not mapped"),
    ],
)
def test_refused_grader_types_say_why(kind: str, reason: str) -> None:
    message = refused({"type": kind, "name": "g"}, f"{PARAM}.type")
    assert repr(kind) in message and reason in message and "string_check" in message


@pytest.mark.parametrize("kind", ["regex", None, ""])
def test_unknown_grader_types_are_refused(kind: str | None) -> None:
    message = refused({"type": kind} if kind is not None else {}, f"{PARAM}.type")
    assert "unknown grader" in message and "'string_check' or 'forgeline'" in message


@pytest.mark.parametrize("operation", ["like", "ne", "EQ", None])
def test_string_check_bad_operation(operation: str | None) -> None:
    message = refused(
        {"type": "string_check", "operation": operation, "reference": "{{item.answer}}"}, f"{PARAM}.operation"
    )
    assert repr(operation) in message and "'eq' or 'ilike'" in message


@pytest.mark.parametrize(
    "reference", ["42", "{{item.answer}} ", "{{sample.output_text}}", "{{item.}}", "{{item.a.b}}", "{{ item.answer"]
)
def test_string_check_reference_must_be_one_row_field(reference: str) -> None:
    message = refused({"type": "string_check", "operation": "eq", "reference": reference}, f"{PARAM}.reference")
    assert repr(reference) in message and "{{item.reference_answer}}" in message


def test_string_check_without_a_reference() -> None:
    refused({"type": "string_check", "operation": "eq"}, f"{PARAM}.reference")


@pytest.mark.parametrize("answer_input", ["{{item.answer}}", "{{sample.output_json}}", "hello"])
def test_string_check_input_must_be_the_sampled_text(answer_input: str) -> None:
    message = refused(
        {"type": "string_check", "operation": "eq", "reference": "{{item.answer}}", "input": answer_input},
        f"{PARAM}.input",
    )
    assert repr(answer_input) in message


def test_a_field_missing_from_rows_is_refused_listing_those_present() -> None:
    message = refused({"type": "string_check", "operation": "eq", "reference": "{{item.reference_answer}}"}, PARAM)
    assert "'reference_answer'" in message and "fields on every row: answer, level" in message
    message = refused({"type": "forgeline", "rewards": [{"name": "numeric_match"}]}, PARAM, ("level",))
    assert "'answer'" in message and "fields on every row: level" in message  # numeric_match's default field
    message = refused({"type": "string_check", "operation": "eq", "reference": "{{item.answer}}"}, PARAM, ())
    assert "fields on every row: none" in message


def test_rewards_without_a_field_need_none() -> None:
    assert rewards_for({"type": "forgeline", "rewards": [{"name": "r1_format"}]}, ()) == [RewardSpec(name="r1_format")]


@pytest.mark.parametrize("name", ["mymodule:reward", "os:system", "accuracy", None])
def test_forgeline_rewards_must_be_builtin(name: str | None) -> None:
    message = refused(
        {"type": "forgeline", "rewards": [{"name": "exact_match"}, {"name": name}]}, f"{PARAM}.rewards[1].name"
    )
    assert repr(name) in message and "exact_match, numeric_match, r1_format, json_valid" in message


@pytest.mark.parametrize("rewards", [None, [], "exact_match", {"name": "exact_match"}])
def test_forgeline_rewards_must_be_a_non_empty_list(rewards: object) -> None:
    assert "non-empty list" in refused({"type": "forgeline", "rewards": rewards}, f"{PARAM}.rewards")


@pytest.mark.parametrize(
    "reward", [{"name": "exact_match", "weight": "heavy"}, {"name": "exact_match", "extra": 1}, "exact_match"]
)
def test_malformed_forgeline_rewards_are_refused(reward: object) -> None:
    with pytest.raises(ForgelineError) as info:
        rewards_for({"type": "forgeline", "rewards": [reward]}, FIELDS)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.param is not None and info.value.param.startswith(f"{PARAM}.rewards[0]")
