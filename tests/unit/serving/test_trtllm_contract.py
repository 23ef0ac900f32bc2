"""Contract tests: what forgeline generates for TensorRT-LLM matches the documented API of the pin.

TensorRT-LLM cannot be installed here (it runs in NVIDIA's container), so these tests check
the generated ``--extra_llm_api_options`` YAML, the ``trtllm-serve`` argv and the manifest
against the names listed below, each with the page that documents it, for bf16, FP8 and
multi-LoRA builds at tp 1 and 8, with both backends. The in-container entry point runs
against a test double of ``tensorrt_llm`` (``trtllm_fake/``) whose functions have the
documented keyword-only signatures, so a wrong argument name fails here too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.errors import ConfigError
from serving.artifacts.torch_build import ArtifactIntegrityError
from serving.artifacts.trtllm_build import (
    TrtllmJob,
    build_options,
    finalize_trtllm_job,
    prepare_trtllm_job,
    read_build_result,
)
from serving.artifacts.trtllm_config import fill_argv, h200_serve_options, serve_argv_template
from serving.artifacts.trtllm_manifest import load_trtllm_manifest
from serving.artifacts.trtllm_version import TRTLLM_IMAGE, TRTLLM_VERSION
from tests.support.tiny_model import build_tiny_adapter

# -- the documented API of TensorRT-LLM 1.2.1 that forgeline relies on -------------------
SERVE_PAGE = "https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html (click options of tensorrt_llm/commands/serve.py)"
KV_PAGE = "https://nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html"
TORCH_ARGS_PAGE = "https://nvidia.github.io/TensorRT-LLM/llm-api/reference/TorchLlmArgs.html"
CUDA_GRAPH_PAGE = "https://nvidia.github.io/TensorRT-LLM/1.0.0/examples/llm_runtime.html (CudaGraphConfig(batch_sizes, enable_padding))"
QUANT_PAGE = "https://nvidia.github.io/TensorRT-LLM/features/quantization.html (KvCacheConfig(dtype='fp8'), ModelOpt offline quantization)"
LORA_PAGE = "https://nvidia.github.io/TensorRT-LLM/features/lora.html (TRTLLM serve/bench with LoRA: YAML and lora_request)"
LORA_MODULES_PAGE = "tensorrt_llm/lora_helper.py get_default_trtllm_modules_to_hf_modules()"

DOCUMENTED_SERVE_FLAGS = {
    "--host": SERVE_PAGE,
    "--port": SERVE_PAGE,
    "--backend": SERVE_PAGE,
    "--max_batch_size": SERVE_PAGE,
    "--max_num_tokens": SERVE_PAGE,
    "--max_seq_len": SERVE_PAGE,
    "--tp_size": SERVE_PAGE,
    "--pp_size": SERVE_PAGE,
    "--kv_cache_free_gpu_memory_fraction": SERVE_PAGE,
    "--extra_llm_api_options": SERVE_PAGE,
    "--tokenizer": SERVE_PAGE,
}
DOCUMENTED_BACKENDS = {"pytorch": SERVE_PAGE, "tensorrt": SERVE_PAGE}
DOCUMENTED_YAML_FIELDS = {
    "kv_cache_config": TORCH_ARGS_PAGE,
    "kv_cache_config.free_gpu_memory_fraction": KV_PAGE,
    "kv_cache_config.enable_block_reuse": KV_PAGE,
    "kv_cache_config.dtype": KV_PAGE + "; " + QUANT_PAGE,
    "enable_chunked_prefill": TORCH_ARGS_PAGE,
    "cuda_graph_config": CUDA_GRAPH_PAGE,
    "cuda_graph_config.batch_sizes": CUDA_GRAPH_PAGE,
    "cuda_graph_config.enable_padding": CUDA_GRAPH_PAGE,
    "lora_config": LORA_PAGE,
    "lora_config.lora_target_modules": LORA_PAGE,
    "lora_config.max_lora_rank": LORA_PAGE,
    "lora_config.max_loras": LORA_PAGE,
    "lora_config.max_cpu_loras": LORA_PAGE,
}
DOCUMENTED_KV_DTYPES = {"auto", "fp8"}  # QUANT_PAGE
DOCUMENTED_LORA_MODULES = {"attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"}  # LORA_MODULES_PAGE
# Manifest fields the issue asks for: version + image digest, GPU, parallelism, input checksums, backend.
REQUIRED_MANIFEST_FIELDS = {"tensorrt_llm", "gpu", "parallelism", "inputs", "backend", "quantization", "serve", "files"}

FAKE = Path(__file__).resolve().parents[2] / "support" / "trtllm_fake"

CASES = [
    pytest.param("none", False, 1, "pytorch", id="bf16-tp1"),
    pytest.param("none", False, 8, "pytorch", id="bf16-tp8"),
    pytest.param("fp8", False, 1, "pytorch", id="fp8-tp1"),
    pytest.param("fp8", False, 8, "pytorch", id="fp8-tp8"),
    pytest.param("none", True, 1, "pytorch", id="multilora-tp1"),
    pytest.param("fp8", True, 8, "pytorch", id="multilora-fp8-tp8"),
    pytest.param("none", False, 1, "tensorrt", id="engine-bf16-tp1"),
    pytest.param("fp8", False, 8, "tensorrt", id="engine-fp8-tp8"),
    pytest.param("none", True, 8, "tensorrt", id="engine-multilora-tp8"),
]


@pytest.fixture(scope="module")
def adapter(tiny_base: Path) -> Path:
    return build_tiny_adapter(tiny_base, tiny_base.parent / "trtllm-adapter")


def _prepare(tmp_path: Path, tiny_base: Path, adapter: Path, quantize: str, multi_lora: bool, tp: int, backend: str) -> TrtllmJob:
    options = build_options(quantize=quantize, multi_lora=multi_lora, tp=tp, backend=backend, smoke_test=False)
    return prepare_trtllm_job(str(tiny_base), adapter, tmp_path / "artifact", options, name="tiny-v1", adapter_name="support")


def _dotted(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict):
            keys |= _dotted(value, f"{path}.")
    return keys


def _flags(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs after ``trtllm-serve MODEL``; every flag we emit takes a value."""
    assert argv[0] == "trtllm-serve" and not argv[1].startswith("--")
    rest = argv[2:]
    assert len(rest) % 2 == 0, rest
    flags = dict(zip(rest[::2], rest[1::2], strict=True))
    assert len(flags) == len(rest) // 2, "a flag is repeated"
    return flags


@pytest.mark.parametrize(("quantize", "multi_lora", "tp", "backend"), CASES)
def test_serving_config_uses_only_documented_names(
    tmp_path: Path, tiny_base: Path, adapter: Path, quantize: str, multi_lora: bool, tp: int, backend: str
) -> None:
    job = _prepare(tmp_path, tiny_base, adapter, quantize, multi_lora, tp, backend)
    root = Path(job.artifact)
    extra = yaml.safe_load((root / "serve/extra_llm_api_options.yaml").read_text())
    undocumented = _dotted(extra) - DOCUMENTED_YAML_FIELDS.keys()
    assert not undocumented, f"YAML fields without a documented source: {undocumented}"

    argv = fill_argv(serve_argv_template(job.serve), artifact=root, host="0.0.0.0", port=8000)
    flags = _flags(argv)
    assert not flags.keys() - DOCUMENTED_SERVE_FLAGS.keys(), f"undocumented flags: {flags.keys() - DOCUMENTED_SERVE_FLAGS.keys()}"
    assert flags["--backend"] in DOCUMENTED_BACKENDS and flags["--backend"] == backend
    assert flags["--tp_size"] == str(tp) and flags["--pp_size"] == "1"
    assert Path(flags["--extra_llm_api_options"]) == root / "serve/extra_llm_api_options.yaml"

    # trtllm-serve replaces its KvCacheConfig with the YAML's: the fraction must be in both, equal.
    kv = extra["kv_cache_config"]
    assert float(flags["--kv_cache_free_gpu_memory_fraction"]) == kv["free_gpu_memory_fraction"]
    assert 0 < kv["free_gpu_memory_fraction"] <= 1
    assert extra["enable_chunked_prefill"] is True

    if backend == "pytorch":
        assert kv["dtype"] in DOCUMENTED_KV_DTYPES and kv["dtype"] == "fp8", "H200 (sm90) serves an FP8 KV cache"
        sizes = extra["cuda_graph_config"]["batch_sizes"]
        assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == int(flags["--max_batch_size"])
        assert extra["cuda_graph_config"]["enable_padding"] is True
        assert "--tokenizer" not in flags
        expected_model = "quantized" if quantize == "fp8" else "checkpoint"
    else:
        # An engine has its KV precision built in; CUDA-graph config is a pytorch-backend field.
        assert "dtype" not in kv and "cuda_graph_config" not in extra
        assert Path(flags["--tokenizer"]) == root / "checkpoint"
        expected_model = "engine"
    assert Path(argv[1]) == root / expected_model

    if multi_lora:
        lora = extra["lora_config"]
        assert set(lora["lora_target_modules"]) <= DOCUMENTED_LORA_MODULES
        assert set(lora["lora_target_modules"]) == {"attn_q", "attn_v"}  # the adapter targets q_proj, v_proj
        assert lora["max_lora_rank"] == 4 and lora["max_cpu_loras"] >= lora["max_loras"] >= 1
        assert kv["free_gpu_memory_fraction"] == 0.85, "the LoRA cache shares the KV-cache pool"
        assert (root / "adapters/support/adapter_config.json").is_file()
        assert job.merged_adapter is None
    else:
        assert "lora_config" not in extra
        assert job.merged_adapter == str(adapter)
        assert kv["free_gpu_memory_fraction"] == 0.9
    assert job.gpus == tp and job.image == TRTLLM_IMAGE


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Put the ``tensorrt_llm`` test double on the path; returns its call log."""
    log = tmp_path / "trtllm-calls.jsonl"
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(log))
    monkeypatch.syspath_prepend(str(FAKE))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    return log


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(
    ("quantize", "multi_lora", "tp", "backend"),
    [CASES[0], CASES[3], CASES[5], CASES[6], CASES[7], CASES[8]],
)
def test_entry_builds_with_documented_calls_and_manifest_records_them(
    tmp_path: Path, tiny_base: Path, adapter: Path, fake_trtllm: Path, quantize: str, multi_lora: bool, tp: int, backend: str
) -> None:
    from serving.artifacts import trtllm_entry

    job = _prepare(tmp_path, tiny_base, adapter, quantize, multi_lora, tp, backend)
    root = Path(job.artifact)
    assert trtllm_entry.main(["build", "--spec", str(root / "job/build-spec.json")]) == 0
    calls = _calls(fake_trtllm)

    if backend == "pytorch" and quantize == "fp8":
        (quant,) = [c["kwargs"] for c in calls if c["call"] == "quantize_and_export"]
        assert (quant["qformat"], quant["kv_cache_dtype"], quant["export_format"]) == ("fp8", "fp8", "hf")
        assert quant["output_dir"] == str(root / "quantized") and quant["model_dir"] == str(root / "checkpoint")
        assert json.loads((root / "quantized/hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    else:
        assert not [c for c in calls if c["call"] == "quantize_and_export"]
    if backend == "tensorrt":
        (llm,) = [c["kwargs"] for c in calls if c["call"] == "LLM"]
        assert llm["model"] == str(root / "checkpoint") and llm["tensor_parallel_size"] == tp
        assert llm["build_config"]["max_batch_size"] == 256 and llm["build_config"]["max_num_tokens"] == 8192
        if quantize == "fp8":
            assert llm["quant_config"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
        if multi_lora:
            assert llm["lora_config"]["lora_dir"] == [str(root / "adapters/support")]
            assert llm["lora_config"]["lora_target_modules"] == ["attn_q", "attn_v"]
        assert [c["call"] for c in calls][-2:] == ["LLM.save", "LLM.shutdown"]
        assert len(list((root / "engine").glob("rank*.engine"))) == tp
    else:
        assert not [c for c in calls if c["call"] == "LLM"]

    manifest = finalize_trtllm_job(job, image_digest="sha256:" + "ab" * 32, digest_source="runtime")
    dumped = manifest.model_dump()
    assert REQUIRED_MANIFEST_FIELDS <= dumped.keys()
    assert manifest.tensorrt_llm.version == TRTLLM_VERSION and manifest.tensorrt_llm.image == TRTLLM_IMAGE
    assert manifest.tensorrt_llm.image_digest == "sha256:" + "ab" * 32
    assert (manifest.gpu.name, manifest.gpu.arch, manifest.gpu.count) == ("NVIDIA H200", "sm90", tp)
    assert (manifest.parallelism.tp, manifest.parallelism.pp) == (tp, 1)
    assert manifest.backend == backend
    assert manifest.quantization.weights == ("fp8" if quantize == "fp8" else "bf16")
    # A bf16 engine keeps the KV precision it was built with (FP8 KV there needs calibration).
    assert manifest.quantization.kv_cache == ("auto" if (backend, quantize) == ("tensorrt", "none") else "fp8")
    assert manifest.quantization.method == {"none": "none", "fp8": "modelopt-engine" if backend == "tensorrt" else "modelopt-hf"}[quantize]
    assert "checkpoint/model.safetensors" in manifest.inputs
    assert ("adapters/support/adapter_model.safetensors" in manifest.inputs) == multi_lora
    assert manifest.adapters == ({"support": "adapters/support"} if multi_lora else {})
    # The argv any launcher runs comes from the manifest alone.
    argv = manifest.serve_argv("/mnt/artifact", port=9000)
    assert argv[1] == f"/mnt/artifact/{manifest.served_model_path}" and _flags(argv)["--port"] == "9000"
    assert load_trtllm_manifest(root).files == manifest.files


def test_manifest_catches_a_changed_file(tmp_path: Path, tiny_base: Path, adapter: Path, fake_trtllm: Path) -> None:
    from serving.artifacts import trtllm_entry

    job = _prepare(tmp_path, tiny_base, adapter, "none", False, 1, "pytorch")
    assert trtllm_entry.main(["build", "--spec", f"{job.artifact}/job/build-spec.json"]) == 0
    finalize_trtllm_job(job)
    (Path(job.artifact) / "serve/extra_llm_api_options.yaml").write_text("kv_cache_config: {}\n")
    with pytest.raises(ArtifactIntegrityError, match="extra_llm_api_options"):
        load_trtllm_manifest(job.artifact)


def test_entry_refuses_an_image_with_another_version(
    tmp_path: Path, tiny_base: Path, adapter: Path, fake_trtllm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.artifacts import trtllm_entry

    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.3.0rc5")
    job = _prepare(tmp_path, tiny_base, adapter, "fp8", False, 1, "pytorch")
    assert trtllm_entry.main(["build", "--spec", f"{job.artifact}/job/build-spec.json"]) == 1
    assert not _calls(fake_trtllm), "nothing may run on the wrong version"
    with pytest.raises(Exception, match="pinned to 1.2.1"):
        read_build_result(job.artifact)


def test_options_are_checked_before_anything_runs() -> None:
    with pytest.raises(ConfigError) as err:
        build_options(tp=3, quantize="int4", backend="vllm")
    assert len(err.value.problems) == 3
    with pytest.raises(Exception, match="tp_size"):
        h200_serve_options(tp=16)
    with pytest.raises(Exception, match="cuda_graph_batch_sizes"):
        h200_serve_options(max_batch_size=8, cuda_graph_batch_sizes=[1, 16])
