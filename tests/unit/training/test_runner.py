"""The launch seam: the entry point command, the generated DeepSpeed config, the process roles."""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.base import torchrun_command
from training.config import DistributedSpec
from training.distributed import deepspeed_config
from training.entry import main
from training.runner import entry_command


def test_torchrun_runs_the_common_entry_point(tmp_path: Path) -> None:
    command = torchrun_command(entry_command(tmp_path / "job.json"), 2)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[-3:] == ["-m", "training.entry", str(tmp_path / "job.json")]


def test_deepspeed_config_follows_the_recipe() -> None:
    two = deepspeed_config(DistributedSpec(strategy="deepspeed", nproc=2, zero_stage=2), on_gpu=False)
    assert two["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in two["zero_optimization"]
    assert two["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in two
    three = deepspeed_config(DistributedSpec(strategy="deepspeed", nproc=2, zero_stage=3, offload="cpu"), on_gpu=True)
    zero = three["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert three["optimizer"]["type"] == "AdamW"  # ZeRO-Offload runs DeepSpeed's CPU Adam


def test_entry_point_rejects_a_bad_job_file_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text('{"name": "x"}')
    assert main([str(bad)]) == 2
    assert main([str(tmp_path / "missing.json")]) == 2


def test_a_train_job_survives_the_json_trip_to_its_processes() -> None:
    from training.config import AdapterSpec, DataSpec, GRPOMethod, ModelSpec, RewardSpec, TrainSpec
    from training.job import TrainJob

    job = TrainJob(
        name="j", model=ModelSpec(base="b"), data=DataSpec(train="t.jsonl"),
        method=GRPOMethod(rewards=[RewardSpec(name="numeric_match", weight=0.5)]), adapter=AdapterSpec(kind="none"),
        train=TrainSpec(batch_size=8), distributed=DistributedSpec(strategy="ddp", nproc=2), recipe_hash="h",
    )
    again = TrainJob.model_validate_json(job.model_dump_json())
    assert again == job and isinstance(again.method, GRPOMethod)
