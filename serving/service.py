"""The production gateway for registry refs, as ``forgeline serve`` runs it.

Wires a `RegistryCatalog` (hot swap, canary), API keys from the control database, quotas
(in-process, or shared through Redis), metrics and the access log from one `ServeSpec`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from registry.client import Registry
from registry.keys import KeyStore
from serving.config import ServeSpec
from serving.gateway.app import create_app
from serving.gateway.catalog import ModelCatalog
from serving.gateway.quota import create_limiter
from serving.registry_catalog import RegistryCatalog
from serving.registry_models import BaseSource, EngineFactory, served_base, torch_engine

logger = logging.getLogger(__name__)


def build_gateway(
    registry: Registry,
    refs: list[str],
    spec: ServeSpec,
    *,
    keys: KeyStore | None = None,
    engine_factory: EngineFactory = torch_engine,
    bases: Sequence[BaseSource] = (),
) -> FastAPI:
    """The gateway app serving ``refs`` and ``bases`` as ``spec`` says.

    Args:
        registry: where refs, aliases and adapters are resolved and canary decisions audited.
        refs: model refs to serve (``name``, ``name@alias``, ``name@3``).
        spec: the recipe's ``serve`` section (or ``forgeline serve``'s options).
        keys: the key store; defaults to the control database's when ``spec.auth``.
        engine_factory: builds each version's engine.
        bases: base models to serve bare (their torch artifact is built once and cached);
            registry LoRA versions trained on one answer by their own name.
    """
    served_bases = [served_base(registry, b, spec=spec, engine_factory=engine_factory) for b in bases]
    catalog = RegistryCatalog(registry, refs, spec=spec, engine_factory=engine_factory, bases=served_bases)
    store = (keys or KeyStore()) if spec.auth else None
    if not spec.auth:
        logger.warning("API-key auth is off: anyone who reaches %s:%s can call the models", spec.host, spec.port)
    return gateway_app(catalog, spec, store)


def gateway_app(catalog: ModelCatalog, spec: ServeSpec, keys: KeyStore | None, *, metrics_per_key: bool = False) -> FastAPI:
    """`create_app` for ``catalog`` with ``spec``'s limits; with ``keys``, quotas go through ``spec.redis_url``
    (in-process when it is unset), and without keys there are none."""
    return create_app(
        catalog,
        max_new_tokens=spec.max_new_tokens,
        keys=keys,
        key_cache_s=spec.key_cache_s,
        limiter=create_limiter(spec.redis_url) if keys is not None else None,
        max_body_bytes=spec.max_body_bytes,
        metrics_per_key=metrics_per_key,
    )


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stdout`` is when a line is written.

    A plain ``StreamHandler(sys.stdout)`` keeps the stream of the moment it was made; where
    stdout is swapped later (pytest's capture per test, a daemonising wrapper) a gateway still
    running writes into a closed file and logging prints a traceback instead of the line.
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ and setStream assign it
        pass


def configure_access_log() -> None:
    """Send the JSON access log (``forgeline.access``) to stdout, one object per line."""
    access = logging.getLogger("forgeline.access")
    if not access.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
