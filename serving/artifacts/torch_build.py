"""Engine build, target ``torch``: merged safetensors + tokenizer + generation config + manifest.

The artifact is written into a hidden sibling folder and renamed into place only when
complete, so a crash never leaves a half-written artifact under ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import ConflictError, ErrorCode, ForgelineError, MissingDependencyError, NotFoundError
from serving.stop_tokens import stop_token_ids

logger = logging.getLogger(__name__)

MANIFEST_NAME = "forgeline-engine.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ArtifactIntegrityError(ForgelineError):
    """An engine artifact's files do not match the checksums in its manifest."""

    code = ErrorCode.INVALID_CONFIG


class EngineManifest(BaseModel):
    """``forgeline-engine.json``: what an engine artifact is made of and how it was built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=1, description="Manifest schema version.")
    target: Literal["torch"] = Field(default="torch", description="Engine target the artifact is built for.")
    base_model: str = Field(description="Base model: hub id or local path.")
    adapter: str | None = Field(default=None, description="Adapter merged into the base, or None.")
    full_weights: str | None = Field(
        default=None, description="A full fine-tune packaged in place of the base's weights, or None (`base_model` is its lineage)."
    )
    created_at: datetime = Field(description="When the build finished (UTC).")
    torch_version: str = Field(description="torch used for the build.")
    transformers_version: str = Field(description="transformers used for the build.")
    peft_version: str | None = Field(default=None, description="peft used for the merge, when installed.")
    files: dict[str, str] = Field(description="Relative path -> sha256 of every file except the manifest.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _write_model(weights: str, adapter: Path | None, tmp: Path, chat_template: str | None) -> None:
    """``weights`` (the base, or a full fine-tune) with ``adapter`` merged in, tokenizer and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer_src: str | Path = adapter if adapter is not None and _has_tokenizer(adapter) else weights
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    # dtype="auto" keeps the checkpoint's dtype; merging in a wider dtype would double the size.
    model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype="auto")
    if adapter is not None:
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise MissingDependencyError("merging an adapter needs peft: pip install peft") from exc
        # Adapters trained with added tokens ship a larger tokenizer; the base must match it.
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(tmp)

    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(tmp)

    # Every artifact carries the base's full stop list: the engines and the upstream relay read it there.
    generation = model.generation_config if model.generation_config is not None else GenerationConfig()
    eos_ids = stop_token_ids(generation, tokenizer)
    if eos_ids:
        generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad is not None:
        generation.pad_token_id = pad
    generation.save_pretrained(tmp)


def build_torch_artifact(
    base_model: str,
    adapter_dir: str | Path | None,
    out_dir: Path,
    *,
    chat_template: str | None = None,
    overwrite: bool = False,
    full_weights: str | Path | None = None,
) -> EngineManifest:
    """Build a portable PyTorch engine artifact: the base with the adapter merged in.

    Args:
        base_model: hub id or local folder of the base causal LM.
        adapter_dir: a PEFT adapter folder to merge, or None to package the base as is.
            Its tokenizer, when it has one, wins over the base's.
        out_dir: where the artifact ends up; must not exist unless ``overwrite``.
        chat_template: a Jinja chat template that replaces the tokenizer's.
        overwrite: replace an existing ``out_dir`` (atomically, after the build succeeded).
        full_weights: a full fine-tune's model folder (trained from ``base_model``): packaged
            instead of the base, with its own tokenizer when it has one; no adapter then.

    Returns:
        The manifest written to ``out_dir / "forgeline-engine.json"``.

    Raises:
        ConflictError: ``out_dir`` exists and ``overwrite`` is False.
        NotFoundError: ``adapter_dir`` does not exist.
    """
    out_dir = Path(out_dir)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None and not adapter.is_dir():
        raise NotFoundError(f"adapter folder {adapter} does not exist", param="adapter_dir")
    full = Path(full_weights) if full_weights is not None else None
    if full is not None:
        if adapter is not None:
            raise ForgelineError(
                "a full fine-tune has no adapter to merge; pass adapter_dir or full_weights, not both",
                code=ErrorCode.INVALID_REQUEST,
                param="full_weights",
            )
        if not (full / "config.json").is_file():
            raise NotFoundError(f"{full} is not a model folder (no config.json)", param="full_weights")
    if out_dir.exists() and not overwrite:
        raise ConflictError(f"{out_dir} already exists; pass overwrite=True or choose another folder", param="out_dir")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        logger.info("building torch artifact from %s%s", full or base_model, f" + {adapter}" if adapter else "")
        _write_model(str(full) if full is not None else base_model, adapter, tmp, chat_template)

        files: dict[str, str] = {}
        for path in _artifact_files(tmp):
            files[path.relative_to(tmp).as_posix()] = _sha256(path)
            _fsync(path)
        import torch
        import transformers

        manifest = EngineManifest(
            base_model=base_model,
            adapter=str(adapter) if adapter is not None else None,
            full_weights=str(full) if full is not None else None,
            created_at=datetime.now(UTC),
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            peft_version=_version("peft"),
            files=files,
        )
        manifest_path = tmp / MANIFEST_NAME
        manifest_path.write_text(manifest.model_dump_json(indent=2) + "\n")
        _fsync(manifest_path)

        old: Path | None = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("torch artifact ready at %s (%d files)", out_dir, len(files))
    return manifest


def load_manifest(artifact_dir: str | Path, *, verify: bool = True) -> EngineManifest:
    """Read an artifact's manifest and, by default, check every file against its sha256.

    Raises:
        NotFoundError: there is no manifest in ``artifact_dir``.
        ArtifactIntegrityError: the manifest is unreadable, or a file is missing or changed.
    """
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise NotFoundError(f"{root} is not an engine artifact: {MANIFEST_NAME} is missing", param="artifact_dir")
    try:
        manifest = EngineManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise ArtifactIntegrityError(f"{path} is not a valid engine manifest: {exc}", param=MANIFEST_NAME) from exc
    if not verify:
        return manifest
    for rel, expected in manifest.files.items():
        file = root / rel
        if not file.is_file():
            raise ArtifactIntegrityError(f"engine artifact {root} is missing {rel}; rebuild it", param=rel)
        actual = _sha256(file)
        if actual != expected:
            raise ArtifactIntegrityError(
                f"engine artifact {root} is corrupt: {rel} has sha256 {actual[:12]}…, "
                f"the manifest says {expected[:12]}…; rebuild it",
                param=rel,
            )
    extra = {p.relative_to(root).as_posix() for p in _artifact_files(root)} - manifest.files.keys()
    if extra:
        # Not fatal (a README is harmless), but a stray weight file could change what loads.
        logger.warning("engine artifact %s has files not in its manifest: %s", root, ", ".join(sorted(extra)))
    return manifest
