"""OpenAI fine-tuning JSONL: every format accepted, bad lines named by number, and the
converted rows pass training's own row checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgeline.finetune.formats import FileFormat, FileFormatError, inspect_jsonl, training_rows
from training.data import check_dpo_row, check_sft_row, grpo_row_check

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "4", "weight": 1},
    ]
}
PREFERENCE = {
    "input": {"messages": [{"role": "user", "content": "Say hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hi!"}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}
PROMPT = {"messages": [{"role": "user", "content": "What is 6*7?"}], "reference_answer": "42", "unit": "none"}


def write(tmp_path: Path, rows: list[Any], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "fmt"), [(CHAT, FileFormat.CHAT), (PREFERENCE, FileFormat.PREFERENCE), (PROMPT, FileFormat.PROMPT)]
)
def test_each_format_is_accepted(tmp_path: Path, row: dict[str, Any], fmt: FileFormat) -> None:
    summary = inspect_jsonl(write(tmp_path, [row, "", row, "   "]))  # blank lines are skipped
    assert summary.format is fmt
    assert summary.rows == 2
    assert summary.reference_fields == (("reference_answer", "unit") if fmt is FileFormat.PROMPT else ())


def test_reference_fields_are_those_on_every_row(tmp_path: Path) -> None:
    other = {"messages": PROMPT["messages"], "reference_answer": "7"}
    assert inspect_jsonl(write(tmp_path, [PROMPT, other])).reference_fields == ("reference_answer",)


def problem_of(tmp_path: Path, bad: Any) -> str:
    path = write(tmp_path, [CHAT, CHAT, bad, CHAT])
    with pytest.raises(FileFormatError) as info:
        inspect_jsonl(path, filename="mine.jsonl")
    assert info.value.param == "file"
    assert info.value.http_status == 400
    message = info.value.message
    assert "'mine.jsonl' has 1 problem(s)" in message
    assert "\n  line 3: " in message
    assert message.splitlines()[-1].startswith("fix: each line must be")
    return message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"text": "hello"}, "no `messages`"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}, "string `content`"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
            "role 'robot'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                ]
            },
            "tool_calls[0] needs `function: {name, arguments}`",
        ),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools[0] needs `function: {name"),
        ({**CHAT, "functions": [{"name": "f"}]}, "legacy form of function calling"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "assistant", "content": "a cat"},
                ]
            },
            "not supported yet",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "yo"}]},
            "only assistant messages may carry",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 2}]},
            "use 0 or 1",
        ),
        ({"messages": [{"role": "assistant", "content": "yo"}]}, "needs a user message"),
    ],
)
def test_each_bad_line_is_named_by_number(tmp_path: Path, bad: Any, expected: str) -> None:
    assert expected in problem_of(tmp_path, bad)


def test_invalid_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(FileFormatError, match="line 2: not UTF-8"):
        inspect_jsonl(path)


def test_a_row_of_another_format_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError) as info:
        inspect_jsonl(write(tmp_path, [CHAT, PREFERENCE, PROMPT]))
    assert "line 2: a preference row in a chat file" in info.value.message
    assert "line 3: a prompt row in a chat file" in info.value.message
    assert "(supervised)" in info.value.message  # the hint is the chat shape


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({**PREFERENCE, "non_preferred_output": PREFERENCE["preferred_output"]}, "identical"),
        ({k: v for k, v in PREFERENCE.items() if k != "input"}, "needs `input`"),
        (
            {**PREFERENCE, "preferred_output": [{"role": "assistant", "content": "a"}] * 2},
            "exactly one assistant message",
        ),
        ({**PREFERENCE, "input": {"messages": [{"role": "assistant", "content": "x"}]}}, "must end with a user"),
    ],
)
def test_bad_preference_rows(tmp_path: Path, bad: dict[str, Any], expected: str) -> None:
    with pytest.raises(FileFormatError, match="line 2: .*" + expected):
        inspect_jsonl(write(tmp_path, [PREFERENCE, bad]))


def test_more_than_five_problems_are_counted(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError) as info:
        inspect_jsonl(write(tmp_path, [CHAT] + ["nope"] * 8))
    message = info.value.message
    assert "has 8 problem(s)" in message
    assert "line 6: not valid JSON" in message and "line 7:" not in message
    assert "... and 3 more" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(FileFormatError, match="'empty.jsonl' (is empty|has no rows)"):
        inspect_jsonl(path)


def test_chat_rows_become_prompt_completion_that_sft_accepts(tmp_path: Path) -> None:
    plain = {"messages": [*CHAT["messages"][:2], {"role": "assistant", "content": "4"}]}
    rows = training_rows(write(tmp_path, [plain]), "supervised")
    assert rows == [
        {
            "prompt": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "2+2?"},
            ],
            "completion": [{"role": "assistant", "content": "4"}],
        }
    ]
    assert check_sft_row(rows[0]) is None


def test_conversations_keep_every_turn_weight_and_tool(tmp_path: Path) -> None:
    # Weights, several assistant turns, tools: trained turn by turn (training.conversations).
    rows = training_rows(write(tmp_path, [CHAT]), "supervised")
    assert rows == [{"messages": CHAT["messages"]}] and check_sft_row(rows[0]) is None
    tool_row = json.loads((Path(__file__).resolve().parents[4] / "recipes/data/tool-use/train.jsonl").read_text().splitlines()[0])
    assert inspect_jsonl(write(tmp_path, [tool_row])).format is FileFormat.CHAT
    rows = training_rows(write(tmp_path, [tool_row]), "supervised")
    assert rows == [{"messages": tool_row["messages"], "tools": tool_row["tools"]}] and check_sft_row(rows[0]) is None


def test_preference_rows_become_dpo_rows(tmp_path: Path) -> None:
    rows = training_rows(write(tmp_path, [PREFERENCE]), "dpo")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert check_dpo_row(rows[0]) is None


def test_prompt_rows_keep_reference_fields_for_grpo(tmp_path: Path) -> None:
    rows = training_rows(write(tmp_path, [PROMPT]), "reinforcement")
    assert rows[0] == {"prompt": PROMPT["messages"], "reference_answer": "42", "unit": "none"}
    assert grpo_row_check(["reference_answer"])(rows[0]) is None


def test_method_format_mismatch_says_what_is_needed(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError) as info:
        training_rows(write(tmp_path, [CHAT]), "dpo")
    assert info.value.param == "training_file"
    assert info.value.message.startswith("file is a chat file, but method `dpo` needs preference rows")
    assert "`supervised`" in info.value.message


def test_invalid_file_for_training_names_training_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError) as info:
        training_rows(write(tmp_path, [CHAT, "oops"]), "supervised")
    assert info.value.param == "training_file"
    assert "line 2" in info.value.message


def test_unknown_method(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="use one of supervised, dpo, reinforcement") as info:
        training_rows(write(tmp_path, [CHAT]), "ppo")
    assert info.value.param == "method"


def test_preference_rows_with_tool_calls_become_dpo_rows(tmp_path: Path) -> None:
    # OpenAI's preference format with `input.tools` and tool-call outputs (the right call preferred).
    pair = json.loads((Path(__file__).resolve().parents[4] / "recipes/data/tool-use/preferences-train.jsonl").read_text().splitlines()[0])
    row = {"input": {"messages": pair["prompt"], "tools": pair["tools"]},
           "preferred_output": pair["chosen"], "non_preferred_output": pair["rejected"]}
    assert inspect_jsonl(write(tmp_path, [row])).format is FileFormat.PREFERENCE
    rows = training_rows(write(tmp_path, [row]), "dpo")
    call = rows[0]["chosen"][0]["tool_calls"][0]["function"]
    assert call["name"] == pair["chosen"][0]["tool_calls"][0]["function"]["name"]
    assert call["arguments"] == json.loads(pair["chosen"][0]["tool_calls"][0]["function"]["arguments"])
    assert rows[0]["tools"] == pair["tools"] and check_dpo_row(rows[0]) is None

    row["non_preferred_output"][0]["tool_calls"][0]["function"]["name"] = "drop_tables"
    with pytest.raises(FileFormatError) as info:
        inspect_jsonl(write(tmp_path, [row]))
    assert "`input.messages` + `non_preferred_output`" in info.value.message and "does not declare" in info.value.message
