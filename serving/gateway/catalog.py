"""Which engine serves which public model name."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from registry.errors import ConflictError, ModelNotFoundError
from serving.engine.base import ChatRelay, Engine, SamplingDefaults

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A model version the gateway serves.

    Attributes:
        name: the public model id clients send, e.g. ``quickstart`` or ``quickstart@production``.
        version: the registry version it is (shown in ``x-forgeline-model-version``).
        engine: what generates for it.
        aliases: further names that resolve to it (``quickstart@production``, ``quickstart@1``).
        artifact: the engine artifact it was built into, for lineage headers.
        created: Unix time shown in ``/v1/models``.
        model: the registered model it is a version of (defaults to ``name``); the
            ``model`` label of its metrics.
        org: the organisation owning the version (lineage tag ``forgeline.org``, set on
            fine-tuned versions); only that organisation's keys see it. None: every key.
        base_model: the bare base weights the engine holds (local folder or hub id), on
            which registry LoRA versions may be stacked; None when they cannot be (a merged
            adapter, or an engine we cannot see into).
        inflight: requests holding a `Lease` on it; a replaced version is unloaded only
            once this drops to zero.
        chat_relay: set when chat requests pass through whole to the engine's workers
            instead of being rendered here (an upstream pool with ``upstream_api: chat``).
        sampling_defaults: the model's ``generation_config`` temperature and top_p, used
            when a request sets neither.
    """

    name: str
    version: str
    engine: Engine
    aliases: tuple[str, ...] = ()
    artifact: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    model: str = ""
    org: str | None = None
    base_model: str | None = None
    inflight: int = field(default=0, compare=False)
    chat_relay: ChatRelay | None = field(default=None, compare=False)
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults, compare=False)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = self.name.partition("@")[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by every alias."""
        return (self.name, *self.aliases)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request holds a lease on this model; False when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.inflight > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class Lease:
    """A request's hold on the served model that answers it.

    Taken synchronously with the routing decision, so a hot swap can never unload the
    model between the two; `release` is idempotent and reports the outcome to
    ``on_release`` (a canary's SLO judge).
    """

    def __init__(
        self,
        served: ServedModel,
        adapter: str | None,
        on_release: Callable[[bool, float], None] | None = None,
        *,
        canary: bool = False,
        adapter_org: str | None = None,
        adapter_model: str | None = None,
    ) -> None:
        self.served = served
        self.adapter = adapter
        self.adapter_org = adapter_org
        self.adapter_model = adapter_model
        self.canary = canary
        self._on_release = on_release
        self._released = False
        served.inflight += 1

    def release(self, *, failed: bool | None = None, latency_s: float = 0.0) -> None:
        """Give the model back; ``failed`` is None when the outcome says nothing (client left)."""
        if self._released:
            return
        self._released = True
        self.served.inflight -= 1
        if self._on_release is not None and failed is not None:
            try:
                self._on_release(failed, latency_s)
            except Exception:  # noqa: BLE001 - judging a canary must never fail a request
                logger.exception("canary bookkeeping failed")


@dataclass(frozen=True)
class Route:
    """Where a request's ``model`` goes: a served model, an optional adapter on it, the
    organisation owning that adapter (None: any key may use it) and, for an adapter found
    in the registry, the registered model it is a version of (the key's pattern must cover
    it: naming an adapter must not reach weights the key could not call by name)."""

    served: ServedModel
    adapter: str | None = None
    adapter_org: str | None = None
    adapter_model: str | None = None


class ModelCatalog(Protocol):
    """Resolves the ``model`` a client sends to a `ServedModel`."""

    def resolve(self, model: str) -> ServedModel:
        """The served model for ``model``; raises `ModelNotFoundError` when there is none."""
        ...

    async def prepare(self, model: str) -> None:
        """Look up, off the event loop, whatever routing ``model`` needs (a no-op for fixed catalogs)."""
        ...

    def route(self, model: str) -> Route:
        """Route ``model`` (``name`` or ``name:adapter``) without holding it; `ModelNotFoundError` when unknown."""
        ...

    def list(self) -> list[ServedModel]:
        """Every served model, once each."""
        ...

    def loaded(self) -> list[ServedModel]:
        """Every loaded model, including those nothing routes to (canaries, draining versions)."""
        ...

    def bind_metrics(self, metrics: Any) -> None:
        """Called once before `start` with the gateway's metrics, for a catalog that reports
        its own events (swaps, canaries) or attaches models it loads later."""
        ...

    def acquire(self, model: str) -> Lease:
        """Route ``model`` (``name`` or ``name:adapter``) and hold the served model; see `Lease`."""
        ...

    async def start(self) -> None:
        """Load every model (the gateway is ready after this)."""
        ...

    async def stop(self) -> None:
        """Unload every model."""
        ...


def model_not_found(model: str) -> ModelNotFoundError:
    """The error OpenAI returns for an unknown model, with our code."""
    return ModelNotFoundError(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class StaticCatalog:
    """A fixed, dict-backed catalog: each served model is reachable by its name and aliases.

    Args:
        models: the served models; two may not share a name or alias.
    """

    def __init__(self, models: Iterable[ServedModel] = ()) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self._models: list[ServedModel] = []
        for model in models:
            self.add(model)

    def add(self, model: ServedModel) -> None:
        """Serve ``model`` under its name and aliases.

        Raises:
            ConflictError: one of its names is already taken.
        """
        taken = [n for n in model.names if n in self._by_name]
        if taken:
            raise ConflictError(f"model name(s) already served: {', '.join(taken)}", param="name")
        for name in model.names:
            self._by_name[name] = model
        self._models.append(model)

    def resolve(self, model: str) -> ServedModel:
        """The served model for ``model``; raises `ModelNotFoundError` when there is none."""
        try:
            return self._by_name[model]
        except KeyError:
            raise model_not_found(model) from None

    def list(self) -> list[ServedModel]:
        """Every served model, once each, in the order added."""
        return list(self._models)

    def loaded(self) -> list[ServedModel]:
        """The served models: a fixed catalog loads nothing else."""
        return self.list()

    def bind_metrics(self, metrics: Any) -> None:
        """Nothing to report: the gateway attaches every model after `start`."""

    async def prepare(self, model: str) -> None:
        """Nothing to look up: every name is known from the start."""

    def route(self, model: str) -> Route:
        """Route ``model`` (``name`` or ``name:adapter``)."""
        return Route(*split_adapter(self, model))

    def acquire(self, model: str) -> Lease:
        """Route ``model`` (``name`` or ``name:adapter``) and hold the served model."""
        route = self.route(model)
        return Lease(route.served, route.adapter, adapter_org=route.adapter_org, adapter_model=route.adapter_model)

    async def start(self) -> None:
        """Start every engine; if one fails, stop the others and raise."""
        engines = unique_engines(self._models)
        results = await asyncio.gather(*(e.start() for e in engines), return_exceptions=True)
        failed = [(e, r) for e, r in zip(engines, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            await stop_engines(engines)
            engine, error = failed[0]
            raise RuntimeError(f"engine {engine.model_id} failed to start: {error}") from error

    async def stop(self) -> None:
        """Stop every engine."""
        await stop_engines(unique_engines(self._models))


def split_adapter(catalog: ModelCatalog, model: str) -> tuple[ServedModel, str | None]:
    """Resolve ``model`` to a served model and an optional adapter (``name:adapter``)."""
    try:
        return catalog.resolve(model), None
    except ModelNotFoundError:
        base, sep, adapter = model.partition(":")
        if not sep or not base or not adapter:
            raise
    try:
        return catalog.resolve(base), adapter
    except ModelNotFoundError:
        raise model_not_found(model) from None


def unique_engines(models: Iterable[ServedModel]) -> list[Engine]:
    """Each engine once, though several names may share one."""
    unique: dict[int, Engine] = {}
    for served in models:
        unique.setdefault(id(served.engine), served.engine)
    return list(unique.values())


async def stop_engines(engines: list[Engine]) -> None:
    """Stop ``engines`` concurrently, logging (not raising) failures."""
    results = await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
    for engine, result in zip(engines, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("stopping engine %s failed: %s", engine.model_id, result)
