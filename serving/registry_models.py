"""Serve registry versions: resolve refs (``name@production``) to built engine artifacts.

The gateway only knows a ``ModelCatalog``; this module fills one from the registry, so
the names clients send follow aliases (``quickstart`` is the ``production`` holder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError, ModelNotFoundError
from registry.runs import download_artifact_uri
from registry.settings import forgeline_home, tracking_uri

from .artifacts.torch_build import MANIFEST_NAME, build_torch_artifact, load_manifest
from .config import ServeSpec
from .engine.base import ChatRelay, Engine, SamplingDefaults
from .engine.torch_engine import TorchEngine
from .gateway.catalog import ServedModel, StaticCatalog

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"


def local_artifact_dir(uri: str, info: VersionInfo, target: str, *, kind: str = "engine") -> Path:
    """A local folder holding the artifact at ``uri``; downloaded once for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri)
    dst = forgeline_home() / "cache" / info.name / str(info.version) / (f"{kind}-{target}" if target else kind)
    done = dst / ".complete"
    if not done.exists():
        dst.mkdir(parents=True, exist_ok=True)
        download_artifact_uri(uri, dst, tracking_uri=tracking_uri())
        done.touch()
    return dst / Path(parsed.path.rstrip("/")).name


def public_names(ref: str, info: VersionInfo) -> list[str]:
    """Every name a client may use for this version; the first is the one listed."""
    names = [f"{info.name}@{alias}" for alias in info.aliases] + [f"{info.name}@{info.version}"]
    if DEFAULT_ALIAS in info.aliases:
        names.insert(0, info.name)
    if ref not in names:
        names.insert(0, ref)
    return list(dict.fromkeys(names))


EngineFactory = Callable[[Path, VersionInfo, str, ServeSpec, Callable[[str], Path]], Engine]
"""Builds the engine for a version: (artifact folder, version, model id, spec, adapter source)."""

LORA_KINDS = lineage.LORA_KINDS


def torch_engine(
    path: Path, info: VersionInfo, model_id: str, spec: ServeSpec, adapters: Callable[[str], Path]
) -> Engine:
    """The default `EngineFactory`: the continuous-batching PyTorch engine with multi-LoRA."""
    return TorchEngine(
        path,
        device=spec.device,
        dtype=spec.dtype,
        max_batch_size=spec.max_batch_size,
        batch_window_ms=spec.batch_window_ms,
        model_id=model_id,
        adapters=adapters,
        max_loaded_adapters=spec.max_loaded_adapters,
        prefill_chunk=spec.prefill_chunk,
        prefix_cache_tokens=spec.prefix_cache_tokens,
    )


def same_base(a: str, b: str) -> bool:
    """Whether two base-model references (local folders or hub ids) name the same weights."""
    # Local folders may be spelled differently (relative, symlinked); hub ids compare as text.
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_source(
    registry: Registry | None, *, served: str, base_model: str | None, static: dict[str, str] | None = None
) -> Callable[[str], Path]:
    """Where ``served:adapter`` finds its LoRA folder.

    ``adapter`` is first looked up in ``static`` (the recipe's ``serve.adapters``), then
    resolved as a registry ref (``support``, ``support@staging``, ``support@3``) of a LoRA
    version trained on ``base_model``, the base weights the engine holds.

    Raises:
        ForgelineError: a ``static`` adapter folder holds no PEFT adapter (``invalid_config``).

    Raises (from the returned function):
        ModelNotFoundError: unknown adapter, not a LoRA version, or trained on another base.
    """
    static = dict(static or {})
    for name, folder in static.items():
        # Checked when serving starts: a typo here would otherwise surface on the first request.
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ForgelineError(
                f"serve.adapters.{name}: {folder} is not a PEFT adapter folder (adapter_config.json is missing); "
                "fix: point it at the adapter a training run saved, or remove it",
                code=ErrorCode.INVALID_CONFIG,
                param=f"serve.adapters.{name}",
            )

    def find(adapter: str) -> Path:
        if adapter in static:
            return Path(static[adapter])
        if registry is None:
            known = ", ".join(sorted(static)) or "none"
            raise ModelNotFoundError(f"`{served}` has no adapter `{adapter}` (adapters: {known})", param="model")
        if base_model is None:
            raise ModelNotFoundError(
                f"`{served}:{adapter}`: `{served}` serves fine-tuned weights (a merged adapter or a full fine-tune), "
                "so registry adapters cannot be stacked on it; serve the base model and ask for `base:adapter`",
                param="model",
            )
        info = registry.resolve(adapter)
        kind = info.tags.get(lineage.ADAPTER)
        if lineage.is_full_fine_tune(info.tags):
            # Every weight changed: it runs as its own engine, never as an adapter on a base.
            raise ModelNotFoundError(
                f"`{adapter}`: {info.ref} is a full fine-tune, not a LoRA adapter, so no served base can run it; "
                f"fix: serve it by name (`forgeline serve --model {info.name}@{info.version}` after "
                f"`forgeline build {info.name}@{info.version}`)",
                param="model",
            )
        if kind not in LORA_KINDS:
            raise ModelNotFoundError(
                f"`{served}:{adapter}`: {info.ref} is not a LoRA adapter (adapter kind {kind!r})", param="model"
            )
        trained_on = info.tags.get(lineage.BASE_MODEL, "")
        if not same_base(trained_on, base_model):
            raise ModelNotFoundError(
                f"`{served}:{adapter}`: {info.ref} was trained on {trained_on!r}, but `{served}` serves "
                f"{base_model!r}; ask for it on a model with that base",
                param="model",
            )
        return local_artifact_dir(info.source, info, "", kind="adapter")

    return find


def served_model(
    registry: Registry,
    ref: str,
    *,
    spec: ServeSpec,
    info: VersionInfo | None = None,
    names: list[str] | None = None,
    engine_factory: EngineFactory = torch_engine,
) -> ServedModel:
    """The engine for one registry ref, not yet started."""
    info = info or registry.resolve(ref)
    target = "tensorrt-llm" if spec.engine == "upstream" else spec.engine
    uri = info.tags.get(lineage.engine_tag(target))
    if not uri:
        flag = " --target tensorrt-llm" if target == "tensorrt-llm" else ""
        raise ForgelineError(
            f"{info.name} v{info.version} has no {target} engine artifact; fix: run `forgeline build {info.name}@{info.version}{flag}`",
            code=ErrorCode.NOT_FOUND,
            param="model",
        )
    path = local_artifact_dir(uri, info, target)
    names = names or public_names(ref, info)
    base: str | None = None
    engine: Engine
    chat_relay: ChatRelay | None = None
    model_dir = path
    if spec.engine == "upstream":
        # A worker (trtllm-serve) serves the artifact; the gateway relays to it over HTTP.
        from .artifacts.trtllm_config import CHECKPOINT_DIR
        from .engine.discovery import DnsDiscovery
        from .engine.upstream import upstream_for_trtllm_artifact

        model_dir = path / CHECKPOINT_DIR  # the Hugging Face checkpoint, with its generation_config

        upstream = upstream_for_trtllm_artifact(
            path,
            spec.worker_urls,
            worker_artifact_dir=spec.upstream_artifact_dir,
            model_id=names[0],
            discovery=DnsDiscovery(spec.upstream_dns) if spec.upstream_dns else None,
            discovery_interval=spec.upstream_discovery_interval_s,
            health_interval=spec.upstream_health_interval_s,
            upstream_api=spec.upstream_api,
            scrape_queue=spec.upstream_scrape_queue,
            policy=spec.upstream_pool,
        )
        engine, chat_relay = upstream, upstream.chat_relay
    else:
        manifest = load_manifest(path)  # verifies checksums before we load weights
        # Registry adapters need the bare base underneath; a merged adapter or a full fine-tune changed it.
        base = manifest.base_model if manifest.adapter is None and manifest.full_weights is None else None
        adapters = adapter_source(registry, served=names[0], base_model=base, static=spec.adapters)
        engine = engine_factory(path, info, names[0], spec, adapters)
        log.info("serving %s v%s from %s as %s", info.name, info.version, path, names)
    return ServedModel(
        name=names[0],
        version=str(info.version),
        engine=engine,
        chat_relay=chat_relay,
        sampling_defaults=SamplingDefaults.from_model_dir(model_dir),
        aliases=tuple(names[1:]),
        artifact=uri,
        model=info.name,
        org=info.tags.get(lineage.ORG),
        base_model=base,
    )


@dataclass(frozen=True)
class BaseSource:
    """An operator's base model to serve bare, with registry LoRA versions stacked on it.

    Attributes:
        name: the public model name clients send.
        source: the base weights: a local folder or a hub id (what fine-tuned versions
            carry in their ``forgeline.base_model`` tag).
        chat_template: a Jinja chat template replacing the tokenizer's, or None.
    """

    name: str
    source: str
    chat_template: str | None = None


BASE_VERSION = "base"
"""The version a served base shows in ``x-forgeline-model-version`` (it is no registry version)."""


def base_artifact_dir(name: str) -> Path:
    """Where the torch artifact of base model ``name`` is cached."""
    return forgeline_home() / "engines" / "bases" / name / "torch"


def served_base(
    registry: Registry | None,
    base: BaseSource,
    *,
    spec: ServeSpec,
    engine_factory: EngineFactory = torch_engine,
) -> ServedModel:
    """The engine for a bare base model, not yet started, serving registry LoRA versions trained on it.

    The torch artifact is built once under `base_artifact_dir` and reused while the base's
    source and chat template stay the same (changed ones rebuild it).
    """
    out = base_artifact_dir(base.name)
    stamp = out.parent / "source.json"
    wanted = {"source": base.source, "chat_template_sha256": _sha(base.chat_template)}
    current = json.loads(stamp.read_text()) if stamp.is_file() else None
    if current != wanted or not (out / MANIFEST_NAME).is_file():
        log.info("building the torch artifact of base %s from %s into %s", base.name, base.source, out)
        try:
            build_torch_artifact(base.source, None, out, chat_template=base.chat_template, overwrite=True)
        except (OSError, ValueError) as exc:  # transformers' "no weights found", unknown model type, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise ForgelineError(
                f"base `{base.name}` cannot be loaded from {base.source}: {first}; fix: repair that folder, or "
                f"`forgeline models remove-base {base.name}` and add it again from a good one",
                code=ErrorCode.UNAVAILABLE,
                param="base",
            ) from exc
        stamp.write_text(json.dumps(wanted) + "\n")
    load_manifest(out)  # verifies checksums before we load weights
    adapters = adapter_source(registry, served=base.name, base_model=base.source, static=spec.adapters)
    # The factory's version slot: a base is no registry version, so it gets a placeholder.
    info = VersionInfo(
        name=base.name, version=0, run_id=None, source=str(out), tags={}, aliases=(), created_ms=int(time.time() * 1000)
    )
    engine = engine_factory(out, info, base.name, spec, adapters)
    log.info("serving base %s (%s) from %s", base.name, base.source, out)
    return ServedModel(
        name=base.name, version=BASE_VERSION, engine=engine, artifact=str(out), model=base.name, base_model=base.source,
        sampling_defaults=SamplingDefaults.from_model_dir(out),
    )  # fmt: skip


def _sha(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def registry_catalog(registry: Registry, refs: list[str], *, spec: ServeSpec) -> StaticCatalog:
    """A catalog serving each ref (two refs naming one version share one engine)."""
    catalog = StaticCatalog()
    seen: dict[tuple[str, int], ServedModel] = {}
    for ref in refs:
        info = registry.resolve(ref)
        key = (info.name, info.version)
        if key in seen:
            continue
        seen[key] = served_model(registry, ref, spec=spec)
        catalog.add(seen[key])
    return catalog
