"""Several processes on one machine: DDP or DeepSpeed ZeRO through the Hugging Face Trainer.

The processes are started by ``torchrun`` (see ``training.runner`` and ``jobs``); here we only turn the
recipe's ``distributed`` section into ``TrainingArguments`` keywords and a DeepSpeed config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from registry.errors import FieldProblem

from .config import DistributedSpec

log = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that logs to MLflow and registers the version."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the job; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """End a job's collective work cleanly: wait for every rank, then close the process group.

    A process group left for interpreter shutdown is destroyed after Python has stopped
    its threads, and gloo's worker threads then abort the process ("terminate called
    without an active exception"): a rank exiting non-zero after the job had succeeded.
    The barrier also keeps the other ranks alive until rank 0 has registered the version.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def deepspeed_config(spec: DistributedSpec, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for the recipe; ``auto`` values are filled in by the HF integration
    from the training arguments, so batch size, accumulation, clipping and precision are stated once."""
    zero: dict[str, Any] = {
        "stage": spec.zero_stage,
        "overlap_comm": on_gpu,  # needs CUDA streams; nothing to overlap on CPU
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if spec.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Save a normal (gathered) state dict so the adapter or model loads without DeepSpeed.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if spec.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if spec.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        # ZeRO-Offload wants DeepSpeed's own CPU Adam; declaring the optimizer here makes DeepSpeed build it.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def write_deepspeed_config(config: dict[str, Any] | str, out: Path) -> Path:
    """Keep the DeepSpeed config the job ran with beside its checkpoints (and in MLflow)."""
    path = out / "deepspeed.json"
    data = json.loads(Path(config).read_text()) if isinstance(config, str) else config
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _configure_deepspeed_on_cpu() -> None:
    """Set up the process group for DeepSpeed when there is no GPU.

    Workaround: transformers (5.x) starts DeepSpeed's process group without a backend; on a
    machine without an accelerator, accelerate then takes the job for a single process, and
    every rank believes it is rank 0 (all log, all register). We create accelerate's state
    ourselves with the gloo backend and tell TrainingArguments to use it. Remove when
    transformers passes ``ddp_backend`` through for DeepSpeed.
    """
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def trainer_kwargs(spec: DistributedSpec) -> dict[str, Any]:
    """``TrainingArguments`` keywords for the strategy (device, backend, DeepSpeed config)."""
    import torch

    on_gpu = torch.cuda.is_available()
    if spec.strategy == "deepspeed":
        config: dict[str, Any] | str = spec.config_file or deepspeed_config(spec, on_gpu=on_gpu)
        kwargs: dict[str, Any] = {"deepspeed": config}
        if not on_gpu:
            _configure_deepspeed_on_cpu()
            kwargs["accelerator_config"] = {"use_configured_state": True}
        return kwargs
    kwargs = {"use_cpu": not on_gpu}
    if spec.strategy == "ddp":
        kwargs["ddp_backend"] = "nccl" if on_gpu else "gloo"
        # LoRA freezes most weights; looking for unused ones every step costs a full graph walk.
        kwargs["ddp_find_unused_parameters"] = False
    return kwargs


def check_distributed(spec: DistributedSpec, *, local: bool = True) -> list[FieldProblem]:
    """What the machine lacks for the strategy (DeepSpeed installed, enough GPUs, the user's config file)."""
    problems = []
    if spec.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            FieldProblem("distributed.strategy", "deepspeed is not installed", "deepspeed",
                         "pip install 'forgeline[deepspeed]', or use strategy: ddp")
        )
    if spec.config_file and not Path(spec.config_file).is_file():
        problems.append(
            FieldProblem("distributed.config_file", "DeepSpeed config file not found", spec.config_file,
                         "check the path (relative paths start at the recipe's folder), or remove it to use the generated config")
        )
    if local and spec.nproc > 1:
        import torch

        gpus = torch.cuda.device_count()
        if gpus and spec.nproc > gpus:
            problems.append(
                FieldProblem("distributed.nproc", f"more processes than GPUs ({gpus})", spec.nproc,
                             f"set nproc to at most {gpus}")
            )
    return problems
