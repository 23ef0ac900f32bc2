"""The torch engine build: merged weights, tokenizer, generation config, verified manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.errors import ConflictError, NotFoundError
from serving.artifacts.torch_build import (
    MANIFEST_NAME,
    ArtifactIntegrityError,
    build_torch_artifact,
    load_manifest,
)
from tests.support.tiny_model import build_tiny_adapter


def test_artifact_has_weights_tokenizer_generation_config_and_manifest(tiny_base: Path, tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact)
    assert manifest.target == "torch"
    assert manifest.base_model == str(tiny_base)
    assert manifest.adapter is None
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= manifest.files.keys()
    assert MANIFEST_NAME not in manifest.files
    generation = json.loads((tiny_artifact / "generation_config.json").read_text())
    assert generation["eos_token_id"] is not None and generation["pad_token_id"] is not None
    # Nothing half-written is left next to the artifact.
    assert not [p for p in tiny_artifact.parent.iterdir() if p.name.startswith(f".{tiny_artifact.name}.")]


def test_load_manifest_rejects_changed_and_missing_files(tiny_artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    config = copy / "config.json"
    config.write_text(config.read_text().replace("{", '{"tampered": true, ', 1))
    with pytest.raises(ArtifactIntegrityError, match="config.json") as info:
        load_manifest(copy)
    assert info.value.param == "config.json"
    assert load_manifest(copy, verify=False).target == "torch"

    (copy / "tokenizer.json").unlink()
    config.write_text((tiny_artifact / "config.json").read_text())
    with pytest.raises(ArtifactIntegrityError, match="missing tokenizer.json"):
        load_manifest(copy)

    with pytest.raises(NotFoundError):
        load_manifest(tmp_path)


def test_existing_out_dir_needs_overwrite(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConflictError):
        build_torch_artifact(str(tiny_base), None, out)
    build_torch_artifact(str(tiny_base), None, out, overwrite=True, chat_template="{{ messages[0]['content'] }}")
    assert not (out / "old.txt").exists()
    assert load_manifest(out).files
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ messages[0]['content'] }}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        build_torch_artifact(str(tmp_path / "no-such-model"), None, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_adapter_is_merged_into_the_weights(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = build_tiny_adapter(tiny_base, tmp_path / "adapter")
    out = tmp_path / "merged"
    manifest = build_torch_artifact(str(tiny_base), adapter, out)
    assert manifest.adapter == str(adapter)
    assert manifest.peft_version

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        base_logits = base(ids).logits
        expected = PeftModel.from_pretrained(base, adapter)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, base_logits, atol=1e-3)
    assert not any(name.startswith("adapter") for name in manifest.files)
