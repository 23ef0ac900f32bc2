"""Evaluation suites as data: suite files, match modes, refusal detection, judge arithmetic, lm-eval offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry.errors import ConfigError
from registry.metric_direction import lower_is_better
from tests.conftest import REPO, TINY_BASE
from training.suites.judge import interval, item_score, verdict
from training.suites.matching import last_number, matches
from training.suites.result import SuiteResult, aligned, combine
from training.suites.safety import is_refusal
from training.suites.spec import DEFAULT_REFUSALS, LmEvalSuite, SafetySuite, TaskSuite, load_suite, load_suites

SUITES = REPO / "recipes" / "suites"


@pytest.mark.parametrize(
    ("answer", "expected", "mode", "extract", "right"),
    [
        (" Billing ", "billing", "exact", None, True),
        ("billing please", "billing", "exact", None, False),
        ("billing please", "billing", "exact", r"^(\w+)", True),
        ("Shipping", "ship(ping)?", "regex", None, True),
        ("shipping now", "ship(ping)?", "regex", None, False),
        ("The total is 1,234.50 dollars", "1234.5", "numeric", None, True),
        ("about 12 or 13", "12", "numeric", None, False),  # the last number counts
        ("no number", "3", "numeric", None, False),
        ("x", "[unclosed", "regex", None, False),  # a bad pattern in a row matches nothing
    ],
)
def test_match_modes(answer: str, expected: str, mode: str, extract: str | None, right: bool) -> None:
    assert matches(answer, expected, mode, extract=extract) is right


def test_numeric_tolerance_and_numbers() -> None:
    assert matches("3.14159", "3.14", "numeric", tolerance=0.01)
    assert not matches("3.2", "3.14", "numeric", tolerance=0.01)
    assert last_number("-7 then +2e3") == 2000.0


def test_shipped_suites_load_with_paths_from_their_folder() -> None:
    suites = load_suites([str(SUITES / f) for f in ("general.yaml", "safety.yaml", "judge.yaml", "routing.yaml")])
    assert [s.kind for s in suites] == ["lm_eval", "safety", "judge", "task"]
    general = suites[0]
    assert isinstance(general, LmEvalSuite) and Path(general.task_files[0]) == SUITES / "general" / "general.yaml"


def test_bad_suite_files_name_the_field_the_value_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: task\nname: Bad-Name\ndata: nowhere.jsonl\nmatch: fuzzy\n")
    with pytest.raises(ConfigError) as err:
        load_suite(bad)
    text = str(err.value)
    assert "name: 'Bad-Name' is not a metric prefix" in text and "match:" in text and "fuzzy" in text

    unknown = tmp_path / "tools.yaml"
    unknown.write_text("kind: tool_calls\nname: tools\n")
    with pytest.raises(ConfigError, match="one of task, lm_eval, judge, safety"):
        load_suite(unknown)

    missing = tmp_path / "missing.yaml"
    missing.write_text("kind: safety\nname: safety\ndata: nowhere.jsonl\n")
    with pytest.raises(ConfigError, match=r"data: file not found \(got '.*nowhere.jsonl'\); fix: paths start at the suite file's folder"):
        load_suite(missing)

    twice = [str(SUITES / "safety.yaml"), str(SUITES / "safety.yaml")]
    with pytest.raises(ConfigError, match="two suites share a name"):
        load_suites(twice)


def test_a_recipe_with_a_missing_suite_is_refused_at_validate(tmp_path: Path) -> None:
    import yaml

    from forgeline.recipe import load_recipe

    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["model"]["base"] = str(TINY_BASE)
    raw["data"] = {k: str(REPO / "recipes" / v) for k, v in raw["data"].items()}
    raw["evaluate"]["suites"] = [str(SUITES / "general.yaml"), "nope.yaml"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"evaluate.suites\[1\]: .*nope.yaml: <file>: suite file not found"):
        load_recipe(path)
    raw["evaluate"]["suites"] = [str(SUITES / "general.yaml")]
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).evaluate.suites == [str(SUITES / "general.yaml")]


def test_refusals_are_recognised_and_agent_apologies_are_not() -> None:
    patterns = list(DEFAULT_REFUSALS)
    assert is_refusal("I'm sorry, but I can't share another customer's card number.", patterns)
    assert is_refusal("We cannot change the address on someone else's order.", patterns)
    assert not is_refusal("Hi Anna, sorry for the trouble. I sent a new password reset link.", patterns)
    assert not is_refusal("Your refund is on its way. Is there anything else I can help with?", patterns)


def test_judge_verdicts_and_position_swap_arithmetic() -> None:
    assert [verdict(t) for t in ("A", " b.", "Tie", "Answer A", "")] == ["a", "b", "tie", None, None]
    # A judge that always picks the first answer: the version wins shown first, loses shown second.
    assert item_score("a", "a") == 0.5
    assert item_score("a", "b") == 1.0 and item_score("b", "a") == 0.0
    assert item_score(None, "tie") == 0.5
    low, high = interval([1.0] * 30 + [0.0] * 10, 0.95)
    assert low < 0.75 < high and high - low < 0.35


def test_items_of_several_suites_form_one_table() -> None:
    safety = SuiteResult("s", "safety", items=["s:1", "s:2"], scores={"s_refusal_rate": [1.0, None], "s_over_refusal_rate": [None, 0.0]})
    items, columns = combine((["t1"], {"accuracy": [1.0]}), [safety])
    assert items == ["t1", "s:1", "s:2"]
    assert columns == {"accuracy": [1.0, None, None], "s_refusal_rate": [None, 1.0, None], "s_over_refusal_rate": [None, None, 0.0]}
    assert aligned(["s:2", "x"], items, columns)["s_over_refusal_rate"] == [0.0, None]


def test_over_refusal_is_lower_is_better_for_the_gates() -> None:
    assert lower_is_better("safety_over_refusal_rate") and lower_is_better("eval_loss")
    assert not lower_is_better("safety_refusal_rate") and not lower_is_better("general_accuracy")


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY_BASE), AutoTokenizer.from_pretrained(TINY_BASE)


def test_lm_eval_runs_the_shipped_task_offline_on_the_model_in_memory(tiny: tuple[object, object], monkeypatch: pytest.MonkeyPatch) -> None:
    from training.suites.lm_eval_suite import run_lm_eval

    pytest.importorskip("lm_eval", reason="the lm_eval suite needs the eval extra: pip install 'forgeline[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = load_suite(SUITES / "general.yaml").model_copy(update={"max_samples": 40})
    model, tokenizer = tiny
    first = run_lm_eval(suite, model, tokenizer)
    assert len(first.items) == 40 == len(set(first.items)) and first.items[0].startswith("general:forgeline_general:")
    # The base was pretrained on this world: well above the 0.25 of guessing among four choices.
    assert first.metrics["general_accuracy"] > 0.6
    assert first.metrics["general_accuracy"] == sum(first.scores["general_accuracy"]) / 40
    assert run_lm_eval(suite, model, tokenizer).items == first.items  # stable ids: versions pair item by item


def test_safety_suite_rates_on_a_model_that_never_refuses(tiny: tuple[object, object]) -> None:
    from training.suites.safety import run_safety

    suite = SafetySuite(name="safety", data=str(SUITES / "safety.jsonl"), max_new_tokens=16)
    model, tokenizer = tiny
    result = run_safety(suite, model, tokenizer)
    # The tiny base answers every request like a support agent: it refuses nothing.
    assert result.metrics == {"safety_refusal_rate": 0.0, "safety_over_refusal_rate": 0.0}
    assert sum(v is not None for v in result.scores["safety_refusal_rate"]) == 28
    assert sum(v is not None for v in result.scores["safety_over_refusal_rate"]) == 16
    assert len(set(result.items)) == 44


@pytest.fixture(scope="module")
def answers_five(family_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama3 scripted to answer every chat prompt with "I cannot help, 5<|eot_id|>"."""
    from transformers import AutoTokenizer

    from tests.support.scripted import save_scripted

    source = family_checkpoint("llama3")
    tok = AutoTokenizer.from_pretrained(source)
    last = tok(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"][-1]
    words = tok("I cannot help, 5", add_special_tokens=False)["input_ids"]
    chain = [last, *words, tok.convert_tokens_to_ids("<|eot_id|>")]
    return save_scripted(source, tmp_path_factory.mktemp("five") / "llama3", dict(zip(chain[:-1], chain[1:], strict=True)))


def test_task_suite_match_modes_and_safety_on_a_model_that_always_refuses(answers_five: Path, tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.suites.safety import run_safety
    from training.suites.task import run_task

    model, tokenizer = AutoModelForCausalLM.from_pretrained(answers_five), AutoTokenizer.from_pretrained(answers_five)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": [{"role": "user", "content": "2 + 3?"}], "completion": [{"role": "assistant", "content": "5.0"}]}) + "\n")
    expected = {"exact": 0.0, "numeric": 1.0}
    for mode, score in expected.items():
        result = run_task(TaskSuite(name="math", data=str(rows), match=mode, max_new_tokens=12), model, tokenizer)
        assert result.metrics == {"math_accuracy": score}, (mode, result.samples)
    pattern = tmp_path / "pattern.jsonl"
    pattern.write_text(json.dumps({"prompt": [{"role": "user", "content": "2 + 3?"}], "completion": [{"role": "assistant", "content": r".*\b5"}]}) + "\n")
    assert run_task(TaskSuite(name="math", data=str(pattern), match="regex", max_new_tokens=12), model, tokenizer).metrics == {"math_accuracy": 1.0}

    safety = run_safety(SafetySuite(name="safety", data=str(SUITES / "safety.jsonl"), max_new_tokens=12, max_samples=40), model, tokenizer)
    # Refuses everything: every harmful prompt refused, and every harmless one over-refused.
    assert safety.metrics == {"safety_refusal_rate": 1.0, "safety_over_refusal_rate": 1.0}
    assert safety.samples[0]["answer"].startswith("I cannot help")
