"""A resolved training job to launch, for launcher tests that do not train it."""

from __future__ import annotations

import pytest

from training.config import AdapterSpec, DataSpec, DistributedSpec, ModelSpec, SFTMethod, TrainSpec
from training.job import TrainJob


@pytest.fixture
def train_job() -> TrainJob:
    """A ZeRO-3 LoRA job on a hub base with shared-filesystem data (nothing here trains it)."""
    return TrainJob(
        name="support-router", model=ModelSpec(base="Qwen/Qwen2.5-0.5B-Instruct"),
        data=DataSpec(train="/shared/data/train.jsonl"), method=SFTMethod(), adapter=AdapterSpec(r=8),
        train=TrainSpec(max_steps=100), distributed=DistributedSpec(strategy="deepspeed", zero_stage=3),
        recipe_hash="0123456789abcdef",
    )
