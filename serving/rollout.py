"""Rollouts: a catalog that follows registry aliases, with hot swap and canary.

`RegistryCatalog` serves registry refs (``quickstart``, ``quickstart@production``) and
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

With ``serve.canary`` set, a share of each served model's traffic goes to the version
its canary alias (``staging``) points to. The canary's outcomes over the last
``slo.window`` seconds are judged against its SLO; on a breach all traffic returns to
``production`` at once, the canary alias is removed through `Registry.delete_alias` (so
the decision is in the audit log, and a restarted gateway does not try the same
candidate again) and the candidate is unloaded.

Operator base models (``bases``) are served bare beside the refs, never swapped. A name
that no served model has is looked up in the registry (`AdapterRoutes`): a LoRA version
trained on a served base answers by its own name, with no restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from registry.client import Registry, VersionInfo
from registry.errors import ConflictError, ForgelineError, NotFoundError
from serving.adapter_routes import AdapterRoutes
from serving.config import CanarySpec, ServeSpec
from serving.gateway.catalog import Lease, Route, ServedModel, model_not_found, stop_engines
from serving.registry_models import EngineFactory, public_names, served_model, torch_engine

logger = logging.getLogger(__name__)

ACTOR = "forgeline-gateway"
"""Who the audit log says removed a failing canary."""

_Key = tuple[str, int]  # (registered model, version)


@dataclass(frozen=True)
class CanaryVerdict:
    """How a canary did over its window."""

    requests: int
    errors: int
    p95_latency_ms: float
    breached: bool
    reason: str

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Canary:
    """Splits one model's traffic and judges the candidate against its SLO.

    The split is deterministic (request ``n`` goes to the candidate when it crosses the
    next ``percent`` boundary), so 10 % means exactly one request in ten.
    """

    def __init__(self, model: str, candidate: ServedModel, baseline: ServedModel, spec: CanarySpec, clock: Any) -> None:
        self.model = model
        self.candidate = candidate
        self.baseline = baseline
        self.spec = spec
        self._clock = clock
        self._count = 0
        self._outcomes: deque[tuple[float, bool, float]] = deque()
        self.tripped = False

    def take(self) -> bool:
        """Whether the next request goes to the candidate."""
        self._count += 1
        p = self.spec.percent / 100.0
        return math.floor(self._count * p) > math.floor((self._count - 1) * p)

    def record(self, failed: bool, latency_s: float) -> CanaryVerdict | None:
        """Add one candidate outcome; the verdict when this one breached the SLO, else None."""
        now = self._clock()
        self._outcomes.append((now, failed, latency_s))
        horizon = now - self.spec.slo.window
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._outcomes.popleft()
        verdict = self.verdict()
        if verdict.breached and not self.tripped:
            self.tripped = True
            return verdict
        return None

    def verdict(self) -> CanaryVerdict:
        """The SLO judgement over the current window."""
        slo = self.spec.slo
        outcomes = list(self._outcomes)
        n = len(outcomes)
        errors = sum(1 for _, failed, _ in outcomes if failed)
        latencies = sorted(latency for _, _, latency in outcomes)
        p95 = latencies[min(n - 1, math.ceil(0.95 * n) - 1)] * 1000 if n else 0.0
        reasons = []
        if n >= slo.min_requests:
            if errors / n > slo.error_rate:
                reasons.append(f"error rate {errors}/{n} = {errors / n:.2f} > {slo.error_rate}")
            if slo.p95_latency_ms is not None and p95 > slo.p95_latency_ms:
                reasons.append(f"p95 latency {p95:.0f} ms > {slo.p95_latency_ms:.0f} ms")
        return CanaryVerdict(n, errors, p95, bool(reasons), "; ".join(reasons) or "within SLO")


class RegistryCatalog:
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
        self._loaded: dict[_Key, ServedModel] = {}
        self._routes: dict[str, ServedModel] = {}
        self._canaries: dict[_Key, Canary] = {}  # keyed by the baseline version
        self._rejected: set[_Key] = set()  # candidates that failed their canary
        self._failed_loads: dict[_Key, float] = {}
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

    # -- following aliases -------------------------------------------------------------

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
            names: dict[_Key, list[str]] = {}
            for ref, info in current.items():
                names.setdefault((info.name, info.version), []).extend(public_names(ref, info))
            wanted: dict[_Key, tuple[VersionInfo, list[str]]] = {
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
        self, current: dict[str, VersionInfo], candidates: dict[str, VersionInfo], names: dict[_Key, list[str]]
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

        canaries: dict[_Key, Canary] = {}
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

    # -- canary ---------------------------------------------------------------------------

    def _judge(self, canary: Canary, failed: bool, latency_s: float) -> None:
        verdict = canary.record(failed, latency_s)
        if verdict is None:
            return
        # Traffic returns to production now, before anything slow happens.
        base_key = (canary.baseline.model, int(canary.baseline.version))
        if self._canaries.get(base_key) is canary:
            del self._canaries[base_key]
        cand_key = (canary.model, int(canary.candidate.version))
        self._rejected.add(cand_key)
        logger.warning(
            "canary %s v%s breached its SLO (%s); all traffic back to v%s",
            canary.model,
            canary.candidate.version,
            verdict.reason,
            canary.baseline.version,
        )
        if self._metrics is not None:
            self._metrics.canary_rollbacks.labels(canary.model).inc()
            self._metrics.canary_active.labels(canary.model, canary.candidate.version).set(0)
        self._spawn(self._roll_back(canary, verdict))

    async def _roll_back(self, canary: Canary, verdict: CanaryVerdict) -> None:
        assert self.spec.canary is not None
        alias = self.spec.canary.alias
        version = int(canary.candidate.version)
        reason = (
            f"canary SLO breached: {verdict.reason} over {verdict.requests} canary request(s) in "
            f"{self.spec.canary.slo.window:g} s (p95 {verdict.p95_latency_ms:.0f} ms, "
            f"{verdict.errors} error(s)); traffic returned to production v{canary.baseline.version}"
        )
        try:
            await asyncio.to_thread(
                self.registry.delete_alias, canary.model, alias, actor=ACTOR, reason=reason, expected_from=version
            )
            logger.warning("removed %s@%s (v%s) and wrote the decision to the audit log", canary.model, alias, version)
        except (ConflictError, NotFoundError) as exc:
            logger.warning("canary rollback of %s@%s: the alias moved meanwhile (%s)", canary.model, alias, exc)
        except Exception:
            logger.exception("canary rollback of %s@%s could not be audited", canary.model, alias)
        key = (canary.model, version)
        in_use = {id(s) for s in self._routes.values()}
        served = self._loaded.get(key)
        if served is not None and id(served) not in in_use:
            del self._loaded[key]
            await self._retire(served)
