"""Tool-use preference pairs for DPO: checked like conversations, rendered exactly, never padded by Arrow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from datasets import Dataset

from training.conversations import ConversationError
from training.data import check_dpo_row
from training.preferences import preference_dataset_rows, render_preference

REPO = Path(__file__).resolve().parents[3]
PAIRS = [json.loads(line) for line in (REPO / "recipes/data/tool-use/preferences-train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    tok.chat_template = (REPO / "recipes" / "templates" / "tiny-tools.jinja").read_text()
    return tok


def _pair(function: str) -> dict:
    return next(p for p in PAIRS if p["chosen"][0]["tool_calls"][0]["function"]["name"] == function)


def test_the_shipped_pairs_are_valid_and_differ_in_the_function() -> None:
    assert all(check_dpo_row(p) is None for p in PAIRS)
    pair = PAIRS[0]
    chosen, rejected = pair["chosen"][0]["tool_calls"][0]["function"], pair["rejected"][0]["tool_calls"][0]["function"]
    assert chosen["arguments"] == rejected["arguments"] and chosen["name"] != rejected["name"]


def test_a_pair_renders_as_the_template_does_with_tools_and_exact_arguments(tokenizer) -> None:
    pair = _pair("transfer")
    text = render_preference(tokenizer, pair)
    whole = tokenizer.apply_chat_template(
        [*pair["prompt"], {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "transfer", "arguments": json.loads(pair["chosen"][0]["tool_calls"][0]["function"]["arguments"])}}]}],
        tools=pair["tools"], tokenize=False,
    )
    assert text["prompt"] + text["chosen"] == whole.rstrip() or text["prompt"] + text["chosen"] == whole
    assert "lookup_order" in text["prompt"]  # the tools are shown to the model
    assert '"name": "transfer"' in text["chosen"] and '"name": "transfer"' not in text["rejected"]


def test_rows_with_different_argument_keys_keep_their_own_arguments(tokenizer) -> None:
    # Through Arrow as conversations, a transfer call would gain `"order_id": null` from the other rows.
    rows = preference_dataset_rows([_pair("transfer"), _pair("lookup_order")], tokenizer)
    back = Dataset.from_list(rows).to_list()
    assert "order_id" not in back[0]["chosen"] and "null" not in back[0]["chosen"]
    assert "team" not in back[1]["chosen"]


def test_pairs_without_tools_go_to_trl_as_they_are(tokenizer) -> None:
    plain = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
              "rejected": [{"role": "assistant", "content": "Go away."}]}]
    assert preference_dataset_rows(plain, tokenizer) is plain


def test_a_template_without_tools_is_refused_with_the_fix() -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    with pytest.raises(ConversationError, match="model.chat_template") as info:
        preference_dataset_rows([_pair("transfer")], bare)
    assert info.value.param == "model.chat_template"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: p["rejected"][0]["tool_calls"][0]["function"].update(name="drop_tables"), "does not declare"),
        (lambda p: p["chosen"][0]["tool_calls"][0]["function"].update(arguments="{oops"), "JSON object"),
        (lambda p: p["rejected"].__setitem__(0, copy.deepcopy(p["chosen"][0])), "identical"),
        (lambda p: p["prompt"].append({"role": "assistant", "content": "hm"}), "must end with a user or tool"),
        (lambda p: p["chosen"][0].update(tool_calls=[]), "needs `content` or `tool_calls`"),
    ],
)
def test_bad_pairs_name_the_problem(change, problem: str) -> None:
    pair = copy.deepcopy(_pair("escalate"))
    change(pair)
    assert problem in (check_dpo_row(pair) or "")
