"""LoRA adapters with random (non-zero) weights for any tiny checkpoint, by target kind."""

from __future__ import annotations

from pathlib import Path

MOE_TARGETS: dict[str, dict[str, object]] = {
    # attention only: plain per-row mixed batches
    "attn": {"target_modules": ["q_proj", "v_proj"]},
    # every linear layer: on Qwen2-MoE that includes the shared expert, which sees flattened
    # (batch * seq) tokens; on Mixtral peft 0.21 maps it onto the fused experts and router
    "linear": {"target_modules": "all-linear"},
    # the fused routed experts (3-D parameters in transformers 5) through target_parameters
    "experts": {"target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
}


def build_lora(base: Path, folder: Path, targets: dict[str, object], *, seed: int) -> Path:
    """Save a rank-4 LoRA on ``base`` with ``targets`` (LoraConfig fields) into ``folder``.

    ``init_lora_weights=False`` draws B randomly instead of zeros, so the adapter visibly
    changes the base's output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **targets)  # type: ignore[arg-type]
    get_peft_model(model, config).save_pretrained(folder)
    return folder
