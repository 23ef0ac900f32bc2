"""Engine builds of full fine-tunes: their own weights are packaged, the base stays their lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.errors import ForgelineError, NotFoundError
from serving.artifacts.torch_build import build_torch_artifact, load_manifest
from serving.artifacts.trtllm_build import CHECKPOINT_DIR, TrtllmBuildOptions, TrtllmConfigError, prepare_trtllm_job
from tests.support.tiny_model import build_tiny_adapter, build_tiny_base


@pytest.fixture(scope="module")
def fine_tuned(tiny_base: Path) -> Path:
    """A "full fine-tune" of the tiny base: the same architecture with other weights."""
    return build_tiny_base(tiny_base.parent / "full-fine-tune", seed=11)


def _weights(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_full_fine_tune_is_built_from_its_own_weights(tiny_base: Path, fine_tuned: Path, tmp_path: Path) -> None:
    manifest = build_torch_artifact(str(tiny_base), None, tmp_path / "engine", full_weights=fine_tuned)
    assert manifest.base_model == str(tiny_base) and manifest.full_weights == str(fine_tuned) and manifest.adapter is None
    assert load_manifest(tmp_path / "engine") == manifest  # checksummed like any artifact
    built, tuned, base = _weights(tmp_path / "engine"), _weights(fine_tuned), _weights(tiny_base)
    assert built.keys() == tuned.keys()
    assert all((built[k] == tuned[k]).all() for k in built)  # type: ignore[union-attr]
    assert any((built[k] != base[k]).any() for k in built)  # type: ignore[union-attr]
    assert {"generation_config.json", "tokenizer.json"} <= manifest.files.keys()


def test_full_weights_are_checked_before_anything_is_written(tiny_base: Path, fine_tuned: Path, tmp_path: Path) -> None:
    adapter = build_tiny_adapter(tiny_base, tmp_path / "adapter")
    with pytest.raises(ForgelineError, match="has no adapter to merge"):
        build_torch_artifact(str(tiny_base), adapter, tmp_path / "a", full_weights=fine_tuned)
    with pytest.raises(NotFoundError, match="no config.json"):
        build_torch_artifact(str(tiny_base), None, tmp_path / "b", full_weights=adapter)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tensorrt_llm_checkpoint_of_a_full_fine_tune(tiny_base: Path, fine_tuned: Path, tmp_path: Path) -> None:
    options = TrtllmBuildOptions(smoke_test=False)
    job = prepare_trtllm_job(str(tiny_base), None, tmp_path / "trt", options, name="full-v1", full_weights=fine_tuned)
    assert job.full_weights == str(fine_tuned) and job.merged_adapter is None and job.base_model == str(tiny_base)
    checkpoint = load_manifest(tmp_path / "trt" / CHECKPOINT_DIR)
    assert checkpoint.full_weights == str(fine_tuned)
    with pytest.raises(TrtllmConfigError, match="full fine-tune has no adapter"):
        prepare_trtllm_job(
            str(tiny_base), None, tmp_path / "trt2", TrtllmBuildOptions(multi_lora=True, smoke_test=False),
            name="full-v1", full_weights=fine_tuned, extra_adapters={"x": tmp_path},
        )
