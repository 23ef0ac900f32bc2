"""Read a PEFT LoRA adapter folder directly: ``adapter_config.json`` and its weights, no PEFT.

PEFT's loader injects a LoRA layer into every target module of the model before it copies
the weights, which is what made a cold load of 50 adapters take seconds. The stacked path
(`serving.engine.multi_lora`) needs only the tensors: per target module ``lora_A`` ``[r, in]``
and ``lora_B`` ``[out, r]`` and the scaling PEFT would apply (``lora_alpha / r``, or
``/ sqrt(r)`` with rsLoRA, per module through ``rank_pattern`` / ``alpha_pattern``).

Adapters that need more than ``B @ A`` added to a Linear (DoRA, LoRA on fused expert
parameters, trained copies of whole modules, ...) are named by `peft_only_reason`: those
go through PEFT (`serving.engine.lora_routing`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

# Config fields that change the forward beyond ``x @ A.T @ B.T * scaling``, with why.
_PEFT_ONLY: dict[str, str] = {
    "use_dora": "it uses DoRA (a per-module magnitude vector)",
    "target_parameters": "it adapts fused parameters through target_parameters (routed experts)",
    "modules_to_save": "it carries trained copies of whole modules (modules_to_save)",
    "trainable_token_indices": "it trains token embeddings (trainable_token_indices)",
    "lora_bias": "its LoRA layers have a bias (lora_bias)",
    "layer_replication": "it replicates base layers (layer_replication)",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens)",
    "arrow_config": "it routes among LoRA experts (arrow_config)",
    "use_bdlora": "it uses block-diagonal LoRA (use_bdlora)",
    "use_qalora": "it pools its inputs (use_qalora)",
}


class AdapterRefused(ValueError):
    """The adapter cannot be served on this base; the message says why and what to do."""


@dataclass(frozen=True)
class LoraLayer:
    """One target module's LoRA: ``delta(x) = x @ a.T @ b.T`` (the scaling is folded into ``b``)."""

    a: Any  # torch.Tensor [r, in]
    b: Any  # torch.Tensor [out, r]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        AdapterRefused: the file is missing or not a JSON object.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRefused(
            f"{path} cannot be read as JSON ({exc}); fix: save the adapter with PEFT's save_pretrained"
        ) from exc
    if not isinstance(config, dict):
        raise AdapterRefused(f"{path} holds {type(config).__name__}, not a JSON object")
    return config


def peft_only_reason(config: dict[str, Any]) -> str | None:
    """Why ``config``'s adapter needs PEFT's own layers (None: plain LoRA the stacked path applies).

    Raises:
        AdapterRefused: the adapter trains the base's biases (``bias`` other than ``none``):
            loading them would change the base weights every other request shares.
    """
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        return f"it is a {peft_type} adapter, not LoRA"
    bias = config.get("bias") or "none"
    if bias != "none":
        raise AdapterRefused(
            f"it trains the base model's biases (bias={bias!r}), which would change the base for every other "
            "request on this engine; fix: retrain with bias='none', or merge it (`forgeline build`) and serve it alone"
        )
    for field, why in _PEFT_ONLY.items():
        if config.get(field):
            return why
    return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (`peft.utils.other.get_pattern_key`): a key matches a module name's tail.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies ``module``'s LoRA output by (``rank`` from the weights)."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
    if r != rank:
        raise AdapterRefused(f"the LoRA weights of `{module}` have rank {rank} but the config says r={r}")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _load_tensors(folder: Path) -> dict[str, Any]:
    for name in WEIGHT_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    raise AdapterRefused(f"{folder} holds no adapter weights ({' or '.join(WEIGHT_FILES)})")


def read_lora(folder: Path, config: dict[str, Any]) -> dict[str, LoraLayer] | str:
    """Every target module's LoRA, keyed by its path in the base model (``model.layers.0.self_attn.q_proj``).

    Returns a string instead when the weights hold more than plain LoRA pairs (DoRA
    magnitudes, embedding LoRA, ...): why they need PEFT.

    Raises:
        AdapterRefused: unreadable weights, a module with ``lora_A`` but no ``lora_B``,
            ranks that disagree with the config.
    """
    tensors = _load_tensors(folder)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = _KEY.match(name)
        if match is None or tensor.dim() != 2:
            return f"its weights hold `{key}`, which is not a plain LoRA matrix"
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if not pairs:
        raise AdapterRefused(f"{folder} holds no LoRA weights")
    layers: dict[str, LoraLayer] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterRefused(f"`{module}` has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterRefused(
                f"`{module}`: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        layers[module] = LoraLayer(a=a, b=b * scaling(config, module, int(a.shape[0])))
    return layers


def matches_target(module: str, targets: Any) -> bool:
    """PEFT's rule for ``target_modules``: a regex string matches the whole name, a list item its tail."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets or ())
