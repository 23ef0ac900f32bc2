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


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_dpo_rows_are_checked_with_file_and_line(tmp_path: Path) -> None:
    from training.config import DPOMethod
    from training.data import check_dpo_row

    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "billing"}],
            "rejected": [{"role": "assistant", "content": "refund"}]}
    assert check_dpo_row(pair) is None
    assert check_dpo_row({"prompt": "q", "chosen": "a", "rejected": "b"}) is None
    assert "identical" in check_dpo_row({"prompt": "q", "chosen": "a", "rejected": "a"})
    path = write(tmp_path / "pairs.jsonl", [pair, {"prompt": "q", "chosen": "a"}, pair, {"prompt": "q", "chosen": "a", "rejected": ["x"]}])
    with pytest.raises(DataError) as info:
        load_data(DataSpec(train=str(path)), seed=0, method=DPOMethod())
    text = str(info.value)
    assert "2 bad row(s)" in text
    assert f"{path}:line 2: missing `rejected`" in text
    assert f"{path}:line 4: `prompt`, `chosen` and `rejected` must all be strings" in text
    assert "prompt, chosen and rejected" in text.splitlines()[-1]


def test_grpo_rows_need_a_prompt_and_every_reference_field_the_rewards_read(tmp_path: Path) -> None:
    from training.config import GRPOMethod, RewardSpec

    method = GRPOMethod(rewards=[RewardSpec(name="numeric_match"), RewardSpec(name="exact_match", field="label"), RewardSpec(name="r1_format")])
    good = {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "label": "two"}
    path = write(tmp_path / "prompts.jsonl", [good, {"prompt": "1+1?", "answer": "2"}, {"answer": "2", "label": "x"}, good])
    with pytest.raises(DataError) as info:
        load_data(DataSpec(train=str(path), eval=str(path)), seed=0, method=method)
    text = str(info.value)
    assert f"{path}:line 2: missing reference field `label`" in text
    assert f"{path}:line 3: missing `prompt`" in text
    ok = write(tmp_path / "ok.jsonl", [good, good])
    split = load_data(DataSpec(train=str(ok), eval=str(ok)), seed=0, method=method)
    assert len(split.train) == 2
