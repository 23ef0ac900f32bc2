"""Canary: a share of a model's traffic to the candidate its canary alias points to.

With ``serve.canary`` set, a share of each served model's traffic goes to the version
its canary alias (``staging``) points to. The canary's outcomes over the last
``slo.window`` seconds are judged against its SLO; on a breach all traffic returns to
``production`` at once, the canary alias is removed through `Registry.delete_alias` (so
the decision is in the audit log, and a restarted gateway does not try the same
candidate again) and the candidate is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from registry.client import Registry
from registry.errors import ConflictError, NotFoundError
from serving.config import CanarySpec, ServeSpec
from serving.gateway.catalog import ServedModel

logger = logging.getLogger(__name__)

ACTOR = "forgeline-gateway"
"""Who the audit log says removed a failing canary."""

VersionKey = tuple[str, int]  # (registered model, version)


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


class CanaryRollbacks:
    """Judges each canary outcome and, on a breach, returns traffic and removes the alias.

    Mixed into `serving.registry_catalog.RegistryCatalog`; the rollout (`serving.rollout`)
    owns the state annotated below.
    """

    registry: Registry
    spec: ServeSpec
    _loaded: dict[VersionKey, ServedModel]
    _routes: dict[str, ServedModel]
    _canaries: dict[VersionKey, Canary]
    _rejected: set[VersionKey]
    _metrics: Any
    _spawn: Callable[[Coroutine[Any, Any, Any]], None]
    _retire: Callable[[ServedModel], Coroutine[Any, Any, None]]

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
