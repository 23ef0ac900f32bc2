"""Serve registry versions: resolve refs (``name@production``) to built engine artifacts.

The gateway only knows a ``ModelCatalog``; this module fills one from the registry, so
the names clients send follow aliases (``quickstart`` is the ``production`` holder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ErrorCode, ForgelineError
from registry.settings import forgeline_home

from .build.torch_build import load_manifest
from .config import ServeSpec
from .engine.torch_engine import TorchEngine
from .gateway.catalog import ServedModel, StaticCatalog

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"


def local_artifact_dir(uri: str, info: VersionInfo, target: str) -> Path:
    """A local folder holding the artifact at ``uri``; downloaded once for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri)
    import mlflow

    dst = forgeline_home() / "cache" / info.name / str(info.version) / f"engine-{target}"
    done = dst / ".complete"
    if not done.exists():
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
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


def served_model(registry: Registry, ref: str, *, spec: ServeSpec) -> ServedModel:
    """The engine for one registry ref, not yet started."""
    info = registry.resolve(ref)
    target = spec.engine
    uri = info.tags.get(lineage.engine_tag(target))
    if not uri:
        raise ForgelineError(
            f"{info.name} v{info.version} has no {target} engine artifact; fix: run `forgeline build {info.name}@{info.version}`",
            code=ErrorCode.NOT_FOUND,
            param="model",
        )
    path = local_artifact_dir(uri, info, target)
    load_manifest(path)  # verifies checksums before we load weights
    names = public_names(ref, info)
    engine = TorchEngine(path, device=spec.device, max_batch_size=spec.max_batch_size, batch_window_ms=spec.batch_window_ms, model_id=names[0])
    log.info("serving %s v%s from %s as %s", info.name, info.version, path, names)
    return ServedModel(name=names[0], version=str(info.version), engine=engine, aliases=tuple(names[1:]), artifact=uri)


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
