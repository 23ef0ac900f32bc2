"""Merges stay exact: for every model family, the built torch engine's logits equal the base
with the LoRA adapter applied unmerged (PEFT's forward), within float32 tolerance.

The adapter has random, non-zero A and B (``init_lora_weights=False``) on ``all-linear``, so a
merge that dropped, transposed (GPT-2's Conv1D is fan-in/fan-out) or mis-scaled a layer, or
split a fused projection (Phi-3 ``qkv_proj``/``gate_up_proj``) wrongly, shows up as a logit
difference far above the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from serving.artifacts.torch_build import build_torch_artifact
from tests.support.families import FAMILIES

ATOL = 1e-4
PROMPT = "Route this ticket: my parcel never arrived and the tracking page shows nothing."


@pytest.mark.parametrize("name", FAMILIES)
def test_built_engine_logits_equal_base_plus_adapter(
    name: str, family_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = family_checkpoint(name)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(tmp_path / "adapter")
    build_torch_artifact(str(base), tmp_path / "adapter", tmp_path / "engine")

    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
        adapted = adapted_model(input_ids=ids).logits
        with adapted_model.disable_adapter():
            bare = adapted_model(input_ids=ids).logits
        engine = AutoModelForCausalLM.from_pretrained(tmp_path / "engine").eval()(input_ids=ids).logits

    assert (adapted - bare).abs().max() > 100 * ATOL, "the adapter must change the logits, or this test proves nothing"
    torch.testing.assert_close(engine, adapted, atol=ATOL, rtol=1e-4)
