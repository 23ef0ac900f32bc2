"""The manifest of a TensorRT-LLM artifact: what was built, with what, for which GPUs.

It is written last, after the in-container build reported success, so an artifact without
one is unfinished. The same file name as the torch target is used (``forgeline-engine.json``);
``target`` tells the two apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import NotFoundError

from .torch_build import MANIFEST_NAME, ArtifactIntegrityError
from .trtllm_config import TrtllmServeOptions, fill_argv

logger = logging.getLogger(__name__)

TARGET = "tensorrt-llm"
BUILD_RESULT = "job/build-result.json"
"""What the in-container entry point writes when it finished (see ``trtllm_entry.py``)."""


class TrtllmRuntime(BaseModel):
    """The TensorRT-LLM release the artifact was built with and must be served with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(description="`tensorrt_llm.__version__` inside the build container.")
    image: str = Field(description="Container image (repository:tag) builds and workers run in.")
    image_digest: str | None = Field(default=None, description="`sha256:` digest of the image, when known.")
    digest_source: Literal["pinned", "runtime", "unresolved"] = Field(description="Where the digest came from.")


class GpuTarget(BaseModel):
    """The GPUs the artifact is tuned for and was built on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Target GPU, e.g. `NVIDIA H200`.")
    arch: str = Field(description="Compute capability as `smXY`.")
    count: int = Field(gt=0, description="GPUs one worker needs (tp * pp).")
    detected: list[str] = Field(default_factory=list, description="`nvidia-smi` name and compute capability seen by the build.")


class Parallelism(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(description="Tensor-parallel size.")
    pp: int = Field(description="Pipeline-parallel size.")


class Quantization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: Literal["bf16", "fp8"] = Field(description="Weight precision served.")
    kv_cache: Literal["auto", "fp8"] = Field(description="KV-cache precision.")
    method: Literal["none", "modelopt-hf", "modelopt-engine"] = Field(
        description="`modelopt-hf`: ModelOpt FP8 checkpoint in HF format (pytorch backend); "
        "`modelopt-engine`: ModelOpt calibration inside the engine build (tensorrt backend)."
    )
    calib_dataset: str | None = Field(default=None, description="Calibration data for FP8 scales.")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    options: TrtllmServeOptions = Field(description="The options the YAML and argv were generated from.")
    extra_llm_api_options: str = Field(description="YAML file passed with `--extra_llm_api_options`, relative to the artifact.")
    argv: list[str] = Field(description="`trtllm-serve` argv template with {artifact}, {host}, {port}.")


class TrtllmManifest(BaseModel):
    """``forgeline-engine.json`` of a ``tensorrt-llm`` artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=1, description="Manifest schema version.")
    target: Literal["tensorrt-llm"] = Field(default=TARGET, description="Engine target.")
    backend: Literal["pytorch", "tensorrt"] = Field(description="`pytorch` serves a checkpoint; `tensorrt` a serialized engine.")
    tensorrt_llm: TrtllmRuntime
    gpu: GpuTarget
    parallelism: Parallelism
    quantization: Quantization
    base_model: str = Field(description="Base model the checkpoint came from.")
    merged_adapter: str | None = Field(default=None, description="Adapter merged into the checkpoint, if any.")
    full_weights: str | None = Field(default=None, description="A full fine-tune built in place of the base, if any.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Multi-LoRA: adapter name -> folder in the artifact.")
    serve: ServeConfig
    inputs: dict[str, str] = Field(description="Build inputs (checkpoint, adapters) -> sha256, relative to the artifact.")
    files: dict[str, str] = Field(description="Every file except the manifest -> sha256.")
    build_seconds: float | None = Field(default=None, description="Wall time of the in-container build.")
    created_at: datetime = Field(description="When the manifest was written (UTC).")

    def serve_argv(self, artifact: str | Path, *, host: str = "0.0.0.0", port: int = 8000) -> list[str]:
        """The ``trtllm-serve`` command for this artifact mounted at ``artifact``."""
        return fill_argv(self.serve.argv, artifact=artifact, host=host, port=port)

    @property
    def served_model_path(self) -> str:
        """MODEL given to ``trtllm-serve``, relative to the artifact (it is also the OpenAI model id)."""
        return self.serve.options.model_dir


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def checksum_tree(root: Path, *, under: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 for files under ``root`` (only in the ``under`` folders, if given)."""
    out: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or (under and not rel.startswith(tuple(f"{u}/" for u in under))):
            continue
        out[rel] = sha256_file(path)
    return out


def load_trtllm_manifest(artifact_dir: str | Path, *, verify: bool = True) -> TrtllmManifest:
    """Read a TensorRT-LLM artifact's manifest and, by default, check every checksum.

    Raises:
        NotFoundError: no manifest (the build never finished, or this is not an artifact).
        ArtifactIntegrityError: the manifest is not a tensorrt-llm manifest, or a file changed.
    """
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise NotFoundError(
            f"{root} has no {MANIFEST_NAME}: the TensorRT-LLM build did not finish; "
            "fix: run it, then `forgeline build REF --target tensorrt-llm --finalize`",
            param="artifact_dir",
        )
    try:
        manifest = TrtllmManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise ArtifactIntegrityError(f"{path} is not a tensorrt-llm manifest: {exc}", param=MANIFEST_NAME) from exc
    if verify:
        for rel, expected in manifest.files.items():
            file = root / rel
            if not file.is_file():
                raise ArtifactIntegrityError(f"TensorRT-LLM artifact {root} is missing {rel}; rebuild it", param=rel)
            if sha256_file(file) != expected:
                raise ArtifactIntegrityError(f"TensorRT-LLM artifact {root} is corrupt: {rel} changed; rebuild it", param=rel)
    return manifest
