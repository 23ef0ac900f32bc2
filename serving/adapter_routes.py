"""Route registry LoRA versions by their own name onto a served base (no restart).

A fine-tuned model (``ft-acme-tiny-support``) is a LoRA version in the registry. When a
client sends its name and no served model has that name, `AdapterRoutes` resolves it in
the registry and, if it is a LoRA version trained on the base a served model holds,
routes the request there with the adapter pinned to the exact version (``name@N``), as
if the client had sent ``base:name@N``. Pinning matters: the engine caches adapters by
name, so an alias move must change the name it is asked for.

A full fine-tune (``adapter: {kind: none}``) changed every weight, so no base can run it:
its name is refused with the fix — serve it as its own engine (``forgeline serve --model
name@production``), where it is built, served by name and hot-swapped like any version.

Resolutions (negative ones too) are cached for ``ttl_s`` so the hot path does not hit
MLflow on every request, and a promotion (alias move) is followed within that time, or
within a second when the gateway's alias watcher sees the move (`forget`). A
flood of random names would miss that cache every time, so the set of registered model
names is cached too (one listing per ``ttl_s``): a name whose model is not registered is
answered 404 without a registry call, and the lookups that do run are bounded in number.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from registry import lineage
from registry.client import Registry, VersionInfo
from registry.errors import ModelNotFoundError
from serving.gateway.catalog import Route, ServedModel, model_not_found
from serving.registry_models import LORA_KINDS, same_base

logger = logging.getLogger(__name__)

MAX_CACHED = 10_000  # bounded (least recently used out): random names cannot grow it without limit
MAX_CONCURRENT_LOOKUPS = 4  # registry lookups in flight at once; more wait (off the event loop)


class AdapterRoutes:
    """Cached registry lookups that turn a LoRA version's name into a `Route`.

    Args:
        registry: where names, aliases and lineage tags are read.
        ttl_s: seconds a lookup (found or not) is trusted.
        static: adapter names configured on the engines (``serve.adapters``); they are
            never looked up in the registry.
        clock: monotonic clock (tests).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        ttl_s: float,
        static: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.static = frozenset(static)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, VersionInfo | None]] = OrderedDict()
        self._names: tuple[float, frozenset[str]] | None = None  # (when listed, registered model names)
        self._names_lock = threading.Lock()
        self._cache_lock = threading.Lock()  # lookups run on worker threads
        self._lookups = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)

    def lookup_needed(self, model: str, routes: Mapping[str, ServedModel]) -> str | None:
        """The registry ref routing ``model`` needs, when it is not cached fresh; else None."""
        if model in routes:
            return None
        base, sep, adapter = model.partition(":")
        ref = adapter if sep else model
        if sep and (base not in routes or routes[base].base_model is None or adapter in self.static or not adapter):
            return None
        return None if self._fresh(ref) else ref

    async def prepare(self, model: str, routes: Mapping[str, ServedModel]) -> None:
        """Look ``model`` up in a worker thread when routing it will need the registry."""
        ref = self.lookup_needed(model, routes)
        if ref is None or self.surely_unregistered(ref):
            return  # `route` answers from the caches without blocking
        async with self._lookups:
            if not self._fresh(ref):
                await asyncio.to_thread(self.lookup, ref)

    def surely_unregistered(self, ref: str) -> bool:
        """True when the fresh list of registered model names lacks ``ref``'s model (no lookup needed)."""
        names = self._names
        if names is None or self._clock() - names[0] >= self.ttl_s:
            return False
        return ref.partition("@")[0] not in names[1]

    def _refresh_names(self) -> None:
        with self._names_lock:  # one listing at a time; the others then see it fresh
            names = self._names
            if names is not None and self._clock() - names[0] < self.ttl_s:
                return
            try:
                self._names = (self._clock(), frozenset(self.registry.list_models()))
            except Exception:  # noqa: BLE001 - without the list, every name is looked up as before
                logger.warning("listing registered models failed; looking names up one by one", exc_info=True)

    def lookup(self, ref: str) -> VersionInfo | None:
        """The version ``ref`` names (None: no such version); cached for ``ttl_s`` (blocking on a miss)."""
        now = self._clock()
        cached = self._cache.get(ref)
        if cached is not None and now - cached[0] < self.ttl_s:
            with self._cache_lock:
                if ref in self._cache:
                    self._cache.move_to_end(ref)
            return cached[1]
        self._refresh_names()
        if self.surely_unregistered(ref):
            return None  # not cached per name: a flood of random names must not evict real entries
        try:
            info: VersionInfo | None = self.registry.resolve(ref)
        except ModelNotFoundError:
            info = None
        except Exception:
            if cached is None:
                raise
            # The registry is unreachable: keep answering with what we knew rather than fail.
            logger.warning("re-resolving %s failed; using the cached answer", ref, exc_info=True)
            return cached[1]
        with self._cache_lock:
            self._cache[ref] = (now, info)
            self._cache.move_to_end(ref)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return info

    def route(self, model: str, routes: Mapping[str, ServedModel]) -> Route:
        """Route ``model``: a served name, ``base:adapter``, or a LoRA version's own name.

        Args:
            model: what the client sent.
            routes: every served name and alias -> served model; for a bare LoRA name the
                first served model (in this order) holding its base answers.

        Raises:
            ModelNotFoundError: nothing serves ``model``.
        """
        served = routes.get(model)
        if served is not None:
            return Route(served)
        base, sep, adapter = model.partition(":")
        if sep:
            served = routes.get(base)
            if served is None or not adapter:
                raise model_not_found(model)
            if adapter in self.static or served.base_model is None:
                return Route(served, adapter)  # the engine knows it, or says why it cannot stack it
            info = self.lookup(adapter)
            if info is None:
                raise model_not_found(model)
            org = info.tags.get(lineage.ORG)
            if not _lora_on(info, served.base_model):
                # The engine explains (not a LoRA, other base) once the org check let the key see it.
                return Route(served, adapter, org, info.name)
            return Route(served, info.ref, org, info.name)
        info = self.lookup(model)
        if info is None:
            raise model_not_found(model)
        bases = [s for s in {id(s): s for s in routes.values()}.values() if s.base_model is not None]
        if lineage.is_full_fine_tune(info.tags) and bases:
            # Not servable on a base: the engine refuses it with the fix (serve it by name)
            # once the org check has let the key see it.
            return Route(bases[0], info.ref, info.tags.get(lineage.ORG), info.name)
        if info.tags.get(lineage.ADAPTER) not in LORA_KINDS:
            raise model_not_found(model)
        for candidate in bases:
            if _lora_on(info, candidate.base_model):  # type: ignore[arg-type]
                return Route(candidate, info.ref, info.tags.get(lineage.ORG), info.name)
        raise model_not_found(model)

    def forget(self) -> None:
        """Drop every cached resolution (an alias moved): the next request looks its name up again."""
        with self._cache_lock:
            self._cache.clear()

    def _fresh(self, ref: str) -> bool:
        cached = self._cache.get(ref)
        return cached is not None and self._clock() - cached[0] < self.ttl_s


def _lora_on(info: VersionInfo, base_model: str) -> bool:
    return info.tags.get(lineage.ADAPTER) in LORA_KINDS and same_base(info.tags.get(lineage.BASE_MODEL, ""), base_model)
