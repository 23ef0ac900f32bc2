"""The one place the TensorRT-LLM version is pinned, with the container image it runs in.

TensorRT-LLM never runs in forgeline's environment: its pins conflict with the training
stack (1.2.1 wants ``transformers==4.57.3`` and torch 2.9), and its wheel comes from
NVIDIA's own index. Builds and workers run in NVIDIA's release container instead, so the
version below and the image tag must move together. 1.2.x is the last line that still has
the TensorRT engine path (``--backend tensorrt``); later releases removed it
(https://nvidia.github.io/TensorRT-LLM/legacy/tensorrt-backend-removal.html).

To move the pin: change ``TRTLLM_VERSION`` (the image tag follows), set
``TRTLLM_IMAGE_DIGEST`` from ``docker buildx imagetools inspect <image>``, re-read the
pages in ``DOCS`` for that version, and update ``tests/unit/serving/test_trtllm_contract.py``.
"""

from __future__ import annotations

TRTLLM_VERSION = "1.2.1"
"""``tensorrt_llm.__version__`` inside the image; the build entry refuses any other."""

TRTLLM_IMAGE_REPO = "nvcr.io/nvidia/tensorrt-llm/release"
"""NGC repository of the release images (the tag is the version)."""

TRTLLM_IMAGE = f"{TRTLLM_IMAGE_REPO}:{TRTLLM_VERSION}"
"""The image builds and workers run in."""

TRTLLM_IMAGE_DIGEST: str | None = None
"""``sha256:…`` of ``TRTLLM_IMAGE`` once someone with NGC access resolved it; None until then.

This machine cannot reach nvcr.io, so the digest is not pinned yet. Builds that run
through a local container runtime record the digest the runtime actually used.
"""

GPU_PRODUCT = "NVIDIA-H200"
"""Kubernetes node label value of ``nvidia.com/gpu.product`` for H200 nodes (GPU feature discovery)."""

GPU_NAME = "NVIDIA H200"
"""What ``nvidia-smi --query-gpu=name`` prints on an H200 (SXM)."""

GPU_ARCH = "sm90"
"""Hopper compute capability 9.0: FP8 tensor cores, FP8 KV cache."""

GPU_MEMORY_GIB = 141
"""HBM3e per H200, by NVIDIA's datasheet."""

DOCS = {
    "trtllm-serve": "https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html",
    "llm-api": "https://nvidia.github.io/TensorRT-LLM/llm-api/reference.html",
    "kv-cache-config": "https://nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html",
    "cuda-graph-config": "https://nvidia.github.io/TensorRT-LLM/1.0.0/examples/llm_runtime.html",
    "lora": "https://nvidia.github.io/TensorRT-LLM/features/lora.html",
    "quantization": "https://nvidia.github.io/TensorRT-LLM/features/quantization.html",
    "quantization-trt-engine": "https://github.com/NVIDIA/TensorRT-LLM/blob/v1.2.1/examples/llm-api/_tensorrt_engine/llm_quantization.py",
    "engine-save": "https://github.com/NVIDIA/TensorRT-LLM/blob/v1.2.1/examples/llm-api/_tensorrt_engine/llm_inference_customize.py",
    "container": "https://nvidia.github.io/TensorRT-LLM/quick-start-guide.html",
}
"""Pages the generated configuration and entry point are checked against."""


def image_reference(digest: str | None = TRTLLM_IMAGE_DIGEST) -> str:
    """The image to pull: pinned by digest when one is known, else by tag."""
    return f"{TRTLLM_IMAGE_REPO}@{digest}" if digest else TRTLLM_IMAGE
