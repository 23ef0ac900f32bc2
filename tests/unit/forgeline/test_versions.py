"""A version's weights are an adapter or a whole model: from lineage, else from its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgeline.versions import version_weights, weights_kind
from registry import lineage
from registry.client import VersionInfo
from registry.errors import ForgelineError


def _info(**tags: str) -> VersionInfo:
    return VersionInfo(name="m", version=3, run_id=None, source="", tags=tags, aliases=(), created_ms=0)


def _folder(folder: Path, *files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name in files:
        (folder / name).write_text(json.dumps({}))
    return folder


def test_the_lineage_tag_decides(tmp_path: Path) -> None:
    adapter = _folder(tmp_path / "a", "adapter_config.json")
    full = _folder(tmp_path / "f", "config.json")
    assert weights_kind(_info(**{lineage.ADAPTER: "lora"}), adapter) == "adapter"
    assert weights_kind(_info(**{lineage.ADAPTER: "qlora"}), adapter) == "adapter"
    assert weights_kind(_info(**{lineage.ADAPTER: "none"}), full) == "full"
    weights = version_weights(_info(**{lineage.ADAPTER: "none", lineage.BASE_MODEL: "org/base"}), full)
    assert not weights.is_adapter and weights.base_model == "org/base" and weights.path == full


def test_untagged_versions_are_told_apart_by_their_files(tmp_path: Path) -> None:
    assert weights_kind(_info(), _folder(tmp_path / "a", "adapter_config.json")) == "adapter"
    assert weights_kind(_info(), _folder(tmp_path / "f", "config.json")) == "full"
    with pytest.raises(ForgelineError, match="neither a PEFT adapter"):
        weights_kind(_info(), tmp_path)


def test_a_tag_that_contradicts_the_files_is_a_clear_error(tmp_path: Path) -> None:
    full = _folder(tmp_path / "f", "config.json")
    with pytest.raises(ForgelineError, match="m@3 is tagged forgeline.adapter=lora, but its artifact .* no adapter_config.json"):
        weights_kind(_info(**{lineage.ADAPTER: "lora"}), full)
    adapter = _folder(tmp_path / "a", "adapter_config.json")
    with pytest.raises(ForgelineError, match="full fine-tune .* no config.json"):
        weights_kind(_info(**{lineage.ADAPTER: "none"}), adapter)
    with pytest.raises(ForgelineError, match="records no base model"):
        version_weights(_info(**{lineage.ADAPTER: "none"}), full)
