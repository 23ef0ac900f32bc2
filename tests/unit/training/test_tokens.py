"""trained_tokens: the examples' tokens (as the trainer cuts them) times the epochs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SUPPORT_DATA, TINY_BASE
from training.config import AdapterSpec, DataSpec, DPOMethod, GRPOMethod, ModelSpec, RewardSpec, SFTMethod, TrainSpec
from training.data import load_data
from training.job import TrainJob
from training.models import load_tokenizer
from training.tokens import trained_tokens as count_tokens


def job(data: Path, method: object, *, epochs: float, max_length: int) -> TrainJob:
    return TrainJob(
        name="ft-acme-tiny-x", model=ModelSpec(base=str(TINY_BASE)), data=DataSpec(train=str(data), eval=str(data)),
        method=method, adapter=AdapterSpec(), train=TrainSpec(epochs=epochs, max_length=max_length), recipe_hash="h",
    )


def trained_tokens(j: TrainJob) -> int | None:
    """What the training job counts, with the tokenizer and training split it trains with."""
    rows = load_data(j.data, seed=j.train.seed, method=j.method).train
    return count_tokens(j.method, j.train, rows, load_tokenizer(j.model))


def test_supervised_tokens_are_rendered_rows_cut_at_max_length_times_epochs(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (SUPPORT_DATA / "train.jsonl").read_text().splitlines()[:20]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(ModelSpec(base=str(TINY_BASE)))
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True)["input_ids"]) for r in rows]
    assert trained_tokens(job(data, SFTMethod(), epochs=3, max_length=512)) == 3 * sum(lengths)
    short = min(lengths) - 1  # every row is cut
    assert trained_tokens(job(data, SFTMethod(), epochs=2, max_length=short)) == 2 * 20 * short


def test_dpo_counts_both_sides_and_grpo_is_not_counted(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": "Route this ticket: my parcel never arrived"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "shipping"}],
           "rejected": [{"role": "assistant", "content": "a long wrong answer about refunds and billing"}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(row) + "\n")
    tokenizer = load_tokenizer(ModelSpec(base=str(TINY_BASE)))
    both = sum(len(tokenizer.apply_chat_template(prompt + row[side], tokenize=True)["input_ids"])
               for side in ("chosen", "rejected"))
    assert trained_tokens(job(data, DPOMethod(), epochs=1, max_length=512)) == both
    grpo = GRPOMethod(rewards=[RewardSpec(name="r1_format")], num_generations=2)
    assert trained_tokens(job(data, grpo, epochs=1, max_length=512)) is None
