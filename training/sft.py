"""SFT on TRL's ``SFTTrainer``: we only translate recipe sections into its config."""

from __future__ import annotations

from typing import Any

from .config import AdapterSpec, SFTMethod, TrainSpec


def peft_config(adapter: AdapterSpec) -> Any | None:
    """PEFT ``LoraConfig`` for the recipe's adapter, or None for a full fine-tune."""
    if adapter.kind == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )


def sft_config(method: SFTMethod, train: TrainSpec, *, output_dir: str, report_to: list[str]) -> Any:
    """TRL ``SFTConfig`` from the recipe's ``method`` and ``train`` sections."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=2,
        seed=train.seed,
        gradient_checkpointing=train.gradient_checkpointing,  # TRL defaults to True; a waste on small models
        max_length=train.max_length,
        completion_only_loss=method.completion_only_loss,
        packing=method.packing,
        report_to=report_to,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def build_sft_trainer(
    model: Any,
    tokenizer: Any,
    method: SFTMethod,
    adapter: AdapterSpec,
    train: TrainSpec,
    *,
    train_rows: list[dict[str, Any]],
    output_dir: str,
    report_to: list[str],
    callbacks: list[Any] | None = None,
) -> Any:
    """A ready ``SFTTrainer``; PEFT wraps the model when the adapter is LoRA."""
    from datasets import Dataset
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=sft_config(method, train, output_dir=output_dir, report_to=report_to),
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        peft_config=peft_config(adapter),
        callbacks=callbacks,
    )
