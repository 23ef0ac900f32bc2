"""`RegistryCatalog`: the gateway's model catalog over registry refs that follow their aliases.

Operator base models (``bases``) are served bare beside the refs, never swapped. A name
that no served model has is looked up in the registry (`AdapterRoutes`): a LoRA version
trained on a served base answers by its own name, with no restart.

How versions are swapped as aliases move is `serving.rollout`; the canary split and its
automatic rollback are `serving.canary`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from registry.client import Registry
from serving.adapter_routes import AdapterRoutes
from serving.canary import Canary, VersionKey
from serving.config import ServeSpec
from serving.gateway.catalog import Lease, Route, ServedModel, model_not_found, stop_engines
from serving.registry_models import EngineFactory, torch_engine
from serving.rollout import AliasRollout


class RegistryCatalog(AliasRollout):
    """Serves registry refs and follows their aliases (hot swap, canary).

    Args:
        registry: the registry to read aliases from and write canary decisions to.
        refs: what to serve, e.g. ``["quickstart"]`` or ``["quickstart@production"]``.
        spec: ``poll_interval_s``, ``drain_timeout_s``, ``canary`` and engine options.
        engine_factory: builds each version's engine (the PyTorch engine by default).
        clock: monotonic clock (tests).
        bases: bare base models (`serving.registry_models.served_base`), served as they are
            and listed before the refs; registry LoRA versions trained on one are routed to it
            by their own name.
    """

    def __init__(
        self,
        registry: Registry,
        refs: list[str],
        *,
        spec: ServeSpec,
        engine_factory: EngineFactory = torch_engine,
        clock: Any = time.monotonic,
        bases: list[ServedModel] | None = None,
    ) -> None:
        self.bases = list(bases or [])
        if not refs and not self.bases:
            raise ValueError("serve at least one model ref or base model")
        self.registry = registry
        self.refs = list(dict.fromkeys(refs))
        self.spec = spec
        self._factory = engine_factory
        self._clock = clock
        self._loaded: dict[VersionKey, ServedModel] = {}
        self._routes: dict[str, ServedModel] = {}
        self._canaries: dict[VersionKey, Canary] = {}  # keyed by the baseline version
        self._rejected: set[VersionKey] = set()  # candidates that failed their canary
        self._failed_loads: dict[VersionKey, float] = {}
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._metrics: Any = None
        # Names learned from the registry are trusted one poll interval (10 s by default).
        ttl = spec.poll_interval_s if spec.poll_interval_s > 0 else 10.0
        self.adapters = AdapterRoutes(registry, ttl_s=ttl, static=spec.adapters, clock=clock)
        self._routes = self._with_bases({})

    # -- ModelCatalog ----------------------------------------------------------------

    def resolve(self, model: str) -> ServedModel:
        """The served model for ``model``; raises `ModelNotFoundError` when there is none."""
        try:
            return self._routes[model]
        except KeyError:
            raise model_not_found(model) from None

    async def prepare(self, model: str) -> None:
        """Resolve a name no served model has in the registry, off the event loop (cached)."""
        await self.adapters.prepare(model, self._routes)

    def route(self, model: str) -> Route:
        """Route ``model``: a served name, ``name:adapter``, or a registry LoRA version's own name."""
        return self.adapters.route(model, self._routes)

    def list(self) -> list[ServedModel]:
        """Every routed model version, once each (canary candidates are not listed)."""
        return list({id(s): s for s in self._routes.values()}.values())

    def loaded(self) -> list[ServedModel]:
        """Every loaded version, canary candidates and bases included (metrics)."""
        return [*self.bases, *self._loaded.values()]

    def acquire(self, model: str) -> Lease:
        """Route ``model``, sending the canary's share to the candidate, and hold the choice."""
        route = self.route(model)
        served, adapter, org, owner_model = route.served, route.adapter, route.adapter_org, route.adapter_model
        canary = self._canaries.get((served.model, int(served.version))) if served.version.isdigit() else None
        if canary is not None and not canary.tripped and canary.take():
            return Lease(
                canary.candidate,
                adapter,
                lambda failed, s: self._judge(canary, failed, s),
                canary=True,
                adapter_org=org,
                adapter_model=owner_model,
            )
        return Lease(served, adapter, adapter_org=org, adapter_model=owner_model)

    async def start(self) -> None:
        """Load every base, ref (and canary candidate), then start following aliases."""
        if self.bases:
            await asyncio.gather(*(b.engine.start() for b in self.bases))
            if self._metrics is not None:
                for base in self.bases:
                    self._metrics.attach_engine(base)
        watch = self.spec.poll_interval_s > 0 and self.spec.watch_interval_s > 0
        try:
            # Read the mark before the aliases: a move committed in between is seen as a change.
            mark = await asyncio.to_thread(self._change_mark) if watch else None
            await self.refresh(initial=True)
        except BaseException:
            await stop_engines([b.engine for b in self.bases])
            raise
        loop = asyncio.get_running_loop()
        if self.spec.poll_interval_s > 0:
            self._poller = loop.create_task(self._poll(), name="forgeline-alias-poller")
        if watch:
            self._watcher = loop.create_task(self._watch(mark), name="forgeline-alias-watcher")

    async def stop(self) -> None:
        """Stop following aliases and unload everything."""
        for task in (self._poller, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._poller = self._watcher = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loaded, self._loaded, self._routes, self._canaries = list(self._loaded.values()), {}, {}, {}
        await stop_engines([s.engine for s in [*self.bases, *loaded]])

    def bind_metrics(self, metrics: Any) -> None:
        """Report swaps, canaries and batch sizes to the gateway's metrics."""
        self._metrics = metrics
