"""``forgeline models add-base``, ``bases`` and ``remove-base`` as operators run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.finetune.base_models import BaseModelStore
from tests.conftest import TINY_BASE

pytestmark = pytest.mark.integration


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    return result.exit_code, result.output


def test_add_list_and_remove_a_base_model(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text((TINY_BASE / "chat_template.jinja").read_text())

    code, out = run("models", "bases")
    assert code == 0 and "no base models yet" in out

    code, out = run(
        "models",
        "add-base",
        "tiny",
        str(TINY_BASE),
        "--chat-template",
        str(template),
        "--description",
        "test base",
        "--lora-r",
        "8",
        "--set",
        "train.max_length=256",
        "--set",
        "train.learning_rate=0.0001",
    )
    assert code == 0, out
    assert "added base model tiny" in out and str(TINY_BASE) in out and "r=8" in out and "max_length=256" in out

    code, out = run("models", "add-base", "qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "--adapter", "qlora")
    assert code == 0, out

    code, out = run("models", "bases")
    assert code == 0, out
    assert "tiny" in out and "qwen2.5-7b-instruct" in out and "custom" in out and "tokenizer" in out
    code, out = run("models", "bases", "--json")
    assert code == 0, out
    listed = {row["name"]: row for row in json.loads(out)}
    assert listed["tiny"]["source"] == str(TINY_BASE.resolve()) and listed["tiny"]["description"] == "test base"
    assert listed["tiny"]["adapter"] == {"r": 8} and listed["tiny"]["train"] == {
        "max_length": 256,
        "learning_rate": 0.0001,
    }
    assert listed["qwen2.5-7b-instruct"]["source"] == "Qwen/Qwen2.5-7B-Instruct"
    assert listed["qwen2.5-7b-instruct"]["adapter"] == {"kind": "qlora"}

    # What a fine-tuning job will see: the template text and the absolute folder.
    store = BaseModelStore()
    record = store.get("tiny")
    store.dispose()
    assert record.chat_template == template.read_text() and record.model_spec().base == str(TINY_BASE.resolve())
    assert record.adapter == {"r": 8} and record.train == {"max_length": 256, "learning_rate": 0.0001}

    code, out = run("models", "add-base", "tiny", "Qwen/Qwen2.5-0.5B")
    assert code == 1 and "--replace" in out
    code, out = run("models", "add-base", "tiny", "Qwen/Qwen2.5-0.5B", "--replace")
    assert code == 0, out

    code, out = run("models", "remove-base", "tiny")
    assert code == 0 and "removed base model tiny" in out
    code, out = run("models", "bases")
    assert "qwen2.5-7b-instruct" in out and "tiny" not in out
    code, out = run("models", "remove-base", "tiny")
    assert code == 1 and "no base model 'tiny'" in out and "qwen2.5-7b-instruct" in out


def test_bad_values_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    cases = [
        (["--set", "train.learning_rate=5"], "train.learning_rate"),
        (["--set", "adapter.kind=dora"], "adapter.kind"),
        (["--set", "max_length=5"], "--set"),
        (["--chat-template", str(tmp_path / "missing.jinja")], "missing.jinja' not found"),
    ]
    for extra, named in cases:
        code, out = run("models", "add-base", "tiny", str(TINY_BASE), *extra)
        lines = out.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], (extra, out)
        assert "Traceback" not in out

    code, out = run("models", "add-base", "tiny", str(tmp_path))
    assert code != 0 and "config.json" in out and len(out.strip().splitlines()) == 1
    code, out = run("models", "add-base", "Tiny:v1", str(TINY_BASE))
    assert code != 0 and out.startswith("error: name:")

    code, out = run("models", "bases")
    assert code == 0 and "no base models yet" in out
