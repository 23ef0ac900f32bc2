"""Rollouts: following registry aliases with hot swap.

The catalog (`RegistryCatalog`) serves registry refs (``quickstart``, ``quickstart@production``) and
follows their aliases. When an alias moves it loads the new version beside the old one,
switches the routing table in one step (no ``await`` in between, so no request sees half
a switch), waits for the old version's in-flight requests to finish, and only then
unloads it: under steady load no request fails.

How a move is noticed: every ``watch_interval_s`` (0.5 s) a background task asks the
control database for the audit log's change mark (`AuditLog.change_mark`: one aggregate
query, no MLflow call) and re-reads the aliases only when it changed, so a promotion
answers from the new version about half an interval plus its load time after approval.
Every alias move forgeline makes writes that log, whichever process makes it, and the
row commits after MLflow moved, so this works across processes on SQLite and PostgreSQL
alike and costs requests nothing. Pushing the registry's ``promoted`` webhook instead
would need every promoting process configured with every gateway's address and a
listener on the gateway, and a lost delivery would go unnoticed; PostgreSQL
``LISTEN/NOTIFY`` does not exist on SQLite. The full re-read every ``poll_interval_s``
(10 s) stays as the backstop for aliases moved outside forgeline (the MLflow UI), which
leave no audit row. ``poll_interval_s: 0`` still means "never follow".

`AliasRollout` holds the loaded versions and the routing table; the catalog face the
gateway uses is `serving.registry_catalog.RegistryCatalog`, the canary `serving.canary`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from registry.client import Registry, VersionInfo
from registry.errors import ForgelineError
from serving.adapter_routes import AdapterRoutes
from serving.canary import Canary, CanaryRollbacks, VersionKey
from serving.config import ServeSpec
from serving.gateway.catalog import ServedModel
from serving.registry_models import EngineFactory, public_names, served_model

logger = logging.getLogger(__name__)

class AliasRollout(CanaryRollbacks):
    """Follows registry aliases: loads new versions beside the old, switches, drains, unloads.

    The state below is set up by `serving.registry_catalog.RegistryCatalog`.
    """

    registry: Registry
    refs: list[str]
    bases: list[ServedModel]
    spec: ServeSpec
    adapters: AdapterRoutes
    _factory: EngineFactory
    _clock: Callable[[], float]
    _loaded: dict[VersionKey, ServedModel]
    _routes: dict[str, ServedModel]
    _canaries: dict[VersionKey, Canary]
    _rejected: set[VersionKey]
    _failed_loads: dict[VersionKey, float]
    _refresh_lock: asyncio.Lock
    _tasks: set[asyncio.Task[Any]]
    _metrics: Any

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.spec.poll_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a registry hiccup must not stop the poller
                logger.warning("re-reading aliases failed; serving what is loaded", exc_info=True)

    def _change_mark(self) -> tuple[int, int] | None:
        """Blocking: the audit log's change mark; None when the control database is unreachable."""
        try:
            return self.registry.audit.change_mark()
        except Exception:  # noqa: BLE001 - the poller still follows aliases meanwhile
            logger.warning("reading the audit log's change mark failed; retrying", exc_info=True)
            return None

    async def _watch(self, mark: tuple[int, int] | None) -> None:
        """Re-read aliases as soon as the audit log shows a move (see the module docstring)."""
        while True:
            await asyncio.sleep(self.spec.watch_interval_s)
            now = await asyncio.to_thread(self._change_mark)
            if now is None or now == mark:
                continue
            logger.info("alias move %d in the audit log; re-reading aliases", now[1])
            # Registry names learned for LoRA routing may have moved too.
            self.adapters.forget()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the old mark: the next tick tries again
                logger.warning("re-reading aliases after a move failed; serving what is loaded", exc_info=True)
                continue
            mark = now

    def _read_registry(self) -> tuple[dict[str, VersionInfo], dict[str, VersionInfo]]:
        """Blocking: the version behind every ref, and every model's canary candidate."""
        current = {ref: self.registry.resolve(ref) for ref in self.refs}
        candidates: dict[str, VersionInfo] = {}
        canary = self.spec.canary
        if canary is not None:
            for name in {info.name for info in current.values()}:
                holder = self.registry.alias_holder(name, canary.alias)
                if holder is not None:
                    candidates[name] = holder
        return current, candidates

    async def refresh(self, *, initial: bool = False) -> None:
        """Re-read aliases; load new versions beside the old, switch, drain and unload the old."""
        async with self._refresh_lock:
            current, candidates = await asyncio.to_thread(self._read_registry)
            names: dict[VersionKey, list[str]] = {}
            for ref, info in current.items():
                names.setdefault((info.name, info.version), []).extend(public_names(ref, info))
            wanted: dict[VersionKey, tuple[VersionInfo, list[str]]] = {
                (i.name, i.version): (i, names[(i.name, i.version)]) for i in current.values()
            }
            for name, info in candidates.items():
                key = (name, info.version)
                if key not in wanted and key not in self._rejected:
                    wanted[key] = (info, [f"{name}@{self.spec.canary.alias}" if self.spec.canary else name])

            for key, (info, public) in wanted.items():
                if key in self._loaded:
                    continue
                try:
                    await self._load(info, public)
                except Exception:
                    if initial and key in {(i.name, i.version) for i in current.values()}:
                        raise
                    self._failed_loads[key] = self._clock()
                    logger.exception("loading %s failed; keeping the version that serves now", info.ref)

            self._switch(current, candidates, names)

    async def _load(self, info: VersionInfo, public: list[str]) -> None:
        key = (info.name, info.version)
        last_failure = self._failed_loads.get(key)
        if last_failure is not None and self._clock() - last_failure < 60:
            raise ForgelineError(f"{info.ref} failed to load less than a minute ago; retrying later")
        public = list(dict.fromkeys(public))
        served = await asyncio.to_thread(
            served_model,
            self.registry,
            public[0],
            spec=self.spec,
            info=info,
            names=public,
            engine_factory=self._factory,
        )
        await served.engine.start()
        if self._metrics is not None:
            self._metrics.attach_engine(served)
        self._loaded[key] = served
        self._failed_loads.pop(key, None)
        logger.info("loaded %s (%s)", info.ref, ", ".join(public))

    def _switch(
        self, current: dict[str, VersionInfo], candidates: dict[str, VersionInfo], names: dict[VersionKey, list[str]]
    ) -> None:
        """Swap the routing table in one synchronous step, then retire what nothing routes to."""
        routes = self._with_bases({})
        for ref, info in current.items():
            served = self._loaded.get((info.name, info.version))
            if served is None:
                # The new version did not load: keep routing this ref's names as before.
                for name in public_names(ref, info):
                    if name in self._routes:
                        routes[name] = self._routes[name]
                continue
            public = list(dict.fromkeys(names[(info.name, info.version)]))
            served.name, served.aliases = public[0], tuple(public[1:])
            for name in public:
                routes.setdefault(name, served)

        canaries: dict[VersionKey, Canary] = {}
        if self.spec.canary is not None:
            for served in {id(s): s for s in routes.values()}.values():
                info = candidates.get(served.model)
                if info is None or not served.version.isdigit():  # a base has no canary
                    continue
                key = (info.name, info.version)
                candidate = self._loaded.get(key)
                if candidate is None or key in self._rejected or str(info.version) == served.version:
                    continue
                base_key = (served.model, int(served.version))
                existing = self._canaries.get(base_key)
                if existing is not None and existing.candidate is candidate:
                    canaries[base_key] = existing  # keep its window and split counter
                else:
                    canaries[base_key] = Canary(served.model, candidate, served, self.spec.canary, self._clock)
                    logger.info(
                        "canary: %s%% of %s v%s traffic goes to v%s",
                        self.spec.canary.percent,
                        served.model,
                        served.version,
                        info.version,
                    )

        swapped = {s.model for name, s in routes.items() if name in self._routes and self._routes[name] is not s}
        self._routes, self._canaries = routes, canaries
        if self._metrics is not None:
            for model in swapped:
                self._metrics.model_swaps.labels(model).inc()
            self._metrics.canary_active.clear()
            for canary in canaries.values():
                self._metrics.canary_active.labels(canary.model, canary.candidate.version).set(1)
        for model in swapped:
            logger.info("hot swap: %s now served by %s", model, {n: s.version for n, s in routes.items()})

        in_use = {id(s) for s in routes.values()} | {id(c.candidate) for c in canaries.values()}
        for key, served in list(self._loaded.items()):
            if id(served) not in in_use:
                del self._loaded[key]
                self._spawn(self._retire(served))

    def _with_bases(self, routes: dict[str, ServedModel]) -> dict[str, ServedModel]:
        for base in self.bases:
            for name in base.names:
                routes.setdefault(name, base)
        return routes

    async def _retire(self, served: ServedModel) -> None:
        drained = await served.drain(self.spec.drain_timeout_s)
        if not drained:
            logger.warning(
                "%s v%s still had %d request(s) after %.0f s; unloading anyway",
                served.model,
                served.version,
                served.inflight,
                self.spec.drain_timeout_s,
            )
        await served.engine.stop()
        logger.info("unloaded %s v%s", served.model, served.version)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
