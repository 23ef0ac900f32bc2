"""What a registered version's artifact is: a PEFT adapter over its base, or a whole model.

Training registers both kinds the same way (the artifact folder ``adapter``); the lineage
tag ``forgeline.adapter`` says which (``none`` is a full fine-tune). Every stage that
loads a version's weights — evaluation, engine builds — asks `version_weights` once,
so a full fine-tune is never handed to PEFT and an adapter never loaded as a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from registry import lineage
from registry.client import VersionInfo
from registry.errors import ErrorCode, ForgelineError

log = logging.getLogger(__name__)

WeightsKind = Literal["adapter", "full"]


@dataclass(frozen=True)
class VersionWeights:
    """A version's weights on this machine.

    Attributes:
        kind: ``adapter`` (a PEFT folder to put on ``base_model``) or ``full`` (a model
            folder loadable on its own).
        path: the local folder.
        base_model: the model the version was trained from (lineage ``forgeline.base_model``):
            what an adapter goes on, and what a full fine-tune is compared against.
    """

    kind: WeightsKind
    path: Path
    base_model: str

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def weights_kind(info: VersionInfo, folder: Path) -> WeightsKind:
    """``adapter`` or ``full``: from the lineage tag, else from the files (versions registered by hand).

    Raises:
        ForgelineError: the tag and the files disagree, or the folder is neither.
    """
    has_adapter = (folder / "adapter_config.json").is_file()
    has_model = (folder / "config.json").is_file()
    tag = info.tags.get(lineage.ADAPTER)
    if tag in lineage.LORA_KINDS:
        if not has_adapter:
            raise ForgelineError(
                f"{info.ref} is tagged {lineage.ADAPTER}={tag}, but its artifact {folder} has no adapter_config.json; "
                "fix: re-register the version from its training run's adapter folder",
                code=ErrorCode.INVALID_CONFIG,
                param="model",
            )
        return "adapter"
    if tag == lineage.FULL_WEIGHTS:
        if not has_model:
            raise ForgelineError(
                f"{info.ref} is a full fine-tune ({lineage.ADAPTER}=none), but its artifact {folder} has no config.json; "
                "fix: re-register the version from its training run's model folder",
                code=ErrorCode.INVALID_CONFIG,
                param="model",
            )
        return "full"
    if has_adapter:
        return "adapter"
    if has_model:
        return "full"
    raise ForgelineError(
        f"{info.ref}: artifact {folder} is neither a PEFT adapter (adapter_config.json) nor a model (config.json); "
        f"fix: register the training output folder, tagged {lineage.ADAPTER}",
        code=ErrorCode.INVALID_CONFIG,
        param="model",
    )


def base_model_of(info: VersionInfo) -> str:
    """The version's base model (lineage), or a clear error when it was registered without one."""
    base = info.tags.get(lineage.BASE_MODEL)
    if not base:
        raise ForgelineError(
            f"{info.ref} records no base model (tag {lineage.BASE_MODEL}); fix: register versions through "
            "`forgeline train`, which records their lineage",
            code=ErrorCode.INVALID_CONFIG,
            param="model",
        )
    return base


def version_weights(info: VersionInfo, folder: Path) -> VersionWeights:
    """The version's weights, given its artifact already copied to ``folder``."""
    kind = weights_kind(info, folder)
    return VersionWeights(kind=kind, path=folder, base_model=base_model_of(info))
