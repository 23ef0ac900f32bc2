"""Checks of a recipe against its base model, from config and tokenizer only (no weights).

``forgeline validate`` must refuse what ``train`` would refuse later: a tokenizer without a
chat template, LoRA targets PEFT cannot find or adapt, the output layer. The model is built
on the ``meta`` device from its config and PEFT applies the recipe's ``LoraConfig`` to it,
so PEFT itself says what training will adapt; that also tells what ``all-linear`` leaves
out on a mixture-of-experts base (transformers 5 stores routed experts as fused 3-D
parameters, which are no ``nn.Linear``: on Qwen2-MoE ``all-linear`` skips them, which is
refused with the two ways to say what is meant).

Bases that are neither a local folder nor in the local hub cache are not checked here
(validation never downloads); training reports their problems.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from registry.errors import FieldProblem

from .config import AdapterSpec, ModelSpec

logger = logging.getLogger(__name__)

OUTPUT_LAYER_FIX = (
    "remove it: served adapters stack on a shared base (multi-LoRA, TensorRT-LLM), which adapts no output layer; "
    "to train the output layer, use adapter.kind: none"
)


@dataclass(frozen=True)
class BaseReport:
    """What the base model says about a recipe: problems (refused) and warnings (allowed)."""

    problems: list[FieldProblem] = field(default_factory=list)
    warnings: list[FieldProblem] = field(default_factory=list)


def check_base(model: ModelSpec, adapter: AdapterSpec) -> BaseReport:
    """Check the recipe's ``model`` and ``adapter`` sections against the base's config and tokenizer.

    Cached per sections, so `forgeline validate` can ask for the warnings after the problems.
    """
    return _check_base(model.model_dump_json(), adapter.model_dump_json())


@lru_cache(maxsize=32)
def _check_base(model_json: str, adapter_json: str) -> BaseReport:
    model = ModelSpec.model_validate_json(model_json)
    adapter = AdapterSpec.model_validate_json(adapter_json)
    source = model.base
    local = Path(source).is_dir()
    report = BaseReport()
    tokenizer = _load(source, "tokenizer", model.trust_remote_code)
    if tokenizer is None:
        if local:
            report.problems.append(
                FieldProblem("model.base", "no tokenizer can be loaded from this folder", source,
                             "give a model folder with its tokenizer files (tokenizer.json, tokenizer_config.json)")
            )
        else:
            report.warnings.append(
                FieldProblem("model.base", "not on this machine (no such folder, not in the hub cache), so its chat "
                             "template and LoRA targets were not checked; training checks them when it loads it",
                             source, "download it first (`hf download NAME`) to have them checked now")
            )
            return report
    elif not model.chat_template and not getattr(tokenizer, "chat_template", None):
        report.problems.append(
            FieldProblem(
                "model.chat_template",
                "the base's tokenizer has no chat template; training formats chat rows and evaluation renders every "
                "prompt with one",
                None,
                "set model.chat_template to a Jinja template (e.g. ChatML), or pick a base that ships one",
            )
        )
    if adapter.kind == "none":
        return report
    config = _load(source, "config", model.trust_remote_code)
    if config is None:
        return report
    _check_targets(config, adapter, model.trust_remote_code, report)
    return report


def _load(source: str, what: str, trust_remote_code: bool) -> Any | None:
    from transformers import AutoConfig, AutoTokenizer

    loader = AutoTokenizer if what == "tokenizer" else AutoConfig
    try:
        return loader.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        logger.debug("cannot check the %s of %s here: %s", what, source, exc)
        return None


def _check_targets(config: Any, adapter: AdapterSpec, trust_remote_code: bool, report: BaseReport) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # shapes and module types only: no memory, no weights read
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(
            FieldProblem("model.base", f"transformers cannot build a causal LM from this config: {exc}",
                         getattr(config, "model_type", None), "use a causal language model")
        )
        return
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), "lm_head") if output is not None else "lm_head"
    experts = {n: p.ndim for n, p in model.named_parameters() if p.ndim == 3}  # fused routed experts
    targets = adapter.target_modules
    if isinstance(targets, list):
        for i, name in enumerate(targets):
            if name == output_name or output_name.endswith(f".{name}"):
                report.problems.append(
                    FieldProblem(f"adapter.target_modules[{i}]", "LoRA on the output layer is not supported", name,
                                 OUTPUT_LAYER_FIX)
                )
        targets = [t for t in targets if not (t == output_name or output_name.endswith(f".{t}"))]
        modules = dict(model.named_modules())
        for i, name in enumerate(adapter.target_modules):
            if name not in targets:
                continue
            matched = [m for n, m in modules.items() if n == name or n.endswith(f".{name}")]
            if not matched:
                report.problems.append(
                    FieldProblem(f"adapter.target_modules[{i}]", "the base has no module of this name", name,
                                 f"use names of its linear layers: {', '.join(_linear_names(model))}")
                )
            elif not all(isinstance(m, _lora_types()) for m in matched):
                kind = next(type(m).__name__ for m in matched if not isinstance(m, _lora_types()))
                report.problems.append(
                    FieldProblem(f"adapter.target_modules[{i}]", f"this is a {kind}, which LoRA cannot adapt", name,
                                 f"use names of its linear layers: {', '.join(_linear_names(model))}"
                                 + (f"; for fused experts use adapter.target_parameters: {', '.join(_short(experts))}"
                                    if experts else ""))
                )
    parameters = [n for n, _ in model.named_parameters()]
    for i, name in enumerate(adapter.target_parameters or []):
        if not any(n == name or n.endswith(f".{name}") for n in parameters):
            report.problems.append(
                FieldProblem(f"adapter.target_parameters[{i}]", "the base has no parameter of this name", name,
                             f"fused expert parameters of this base: {', '.join(_short(experts)) or 'none'}")
            )
    if report.problems:
        return
    if isinstance(targets, list) and not targets and not adapter.target_parameters:
        return
        if not targets and not adapter.target_parameters:
            return
    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, target_modules=targets,
                      target_parameters=adapter.target_parameters or None, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, lora)
    except (ValueError, TypeError, RuntimeError) as exc:
        path = "adapter.target_parameters" if "parameter" in str(exc).lower() else "adapter.target_modules"
        report.problems.append(
            FieldProblem(path, f"PEFT cannot apply this LoRA to the base: {' '.join(str(exc).split())[:300]}",
                         adapter.target_parameters if path.endswith("parameters") else adapter.target_modules,
                         f"use names of the base's linear layers: {', '.join(_linear_names(model)) or 'none found'}"
                         + (f"; fused expert parameters: {', '.join(_short(experts))}" if experts else ""))
        )
        return
    covered = _covered_parameters(peft_model)
    missed = sorted(n for n in experts if _strip(n) not in covered)
    if missed and adapter.target_modules == "all-linear":
        # Refused, not warned: "all linear" that trains none of the experts' weights is not
        # what the recipe says, and either fix is one line.
        names = _short(missed)
        report.problems.append(
            FieldProblem(
                "adapter.target_modules",
                f"all-linear leaves the routed experts unadapted: {', '.join(names)} are fused expert parameters "
                f"({len(missed)} across the layers), not linear layers",
                "all-linear",
                f"to adapt them, add `adapter.target_parameters: [{', '.join(names)}]` (served adapters on them run "
                "in batches of their own); to adapt attention and shared layers only, list them in target_modules",
            )
        )


def _covered_parameters(peft_model: Any) -> set[str]:
    """Full names of the parameters PEFT wraps through ``target_parameters``."""
    covered = set()
    for name, module in peft_model.named_modules():
        parameter = getattr(module, "parameter_name", None)
        if parameter and hasattr(module, "lora_A"):
            covered.add(_strip(f"{name}.{parameter}"))
    return covered


def _strip(name: str) -> str:
    """``base_model.model.x.base_layer.base_layer.p`` -> ``x.p``: one spelling for wrapped and plain names."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def _short(names: Any) -> list[str]:
    """Parameter names without their layer prefix (``mlp.experts.gate_up_proj``), once each."""
    out: dict[str, None] = {}
    for name in names:
        parts = _strip(name).split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        out[".".join(parts[digits[-1] + 1 :] if digits else parts)] = None
    return list(out)


def _lora_types() -> tuple[type, ...]:
    """Module types PEFT's LoRA adapts (peft 0.21)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def _linear_names(model: Any) -> list[str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not output}
    return sorted(names)
