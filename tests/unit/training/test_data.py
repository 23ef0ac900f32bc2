from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import DataSpec
from training.data import DataError, check_sft_row, load_data

GOOD = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "billing"}]}


def test_row_formats() -> None:
    assert check_sft_row(GOOD) is None
    assert check_sft_row({"prompt": "q", "completion": "a"}) is None
    assert check_sft_row({"messages": [{"role": "user", "content": "x"}]}) is None
    assert check_sft_row({"text": "plain"}) is None
    assert "both be strings" in check_sft_row({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]})
    assert "no known fields" in check_sft_row({"question": "q"})
    assert "message" in check_sft_row({"messages": [{"role": "robot", "content": "x"}]})


def test_bad_rows_are_reported_with_line_numbers_and_a_count(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD)] * 3 + ["{not json"] + [json.dumps({"question": i}) for i in range(8)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_data(DataSpec(train=str(path)), seed=0)
    text = str(info.value)
    assert "9 bad row(s)" in text
    assert f"{path}:line 4: invalid JSON" in text
    assert f"{path}:line 5:" in text
    assert "and 4 more" in text
    assert "training did not start" in text


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a = load_data(DataSpec(train=str(path), eval_fraction=0.2), seed=1)
    b = load_data(DataSpec(train=str(path), eval_fraction=0.2), seed=1)
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a.eval == b.eval and a.digest == b.digest
    assert not {r["prompt"] for r in a.eval} & {r["prompt"] for r in a.train}


def test_digest_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    first = load_data(DataSpec(train=str(path), eval=str(path)), seed=0).digest
    path.write_text(json.dumps({"prompt": "q", "completion": "b"}) + "\n")
    assert load_data(DataSpec(train=str(path), eval=str(path)), seed=0).digest != first
