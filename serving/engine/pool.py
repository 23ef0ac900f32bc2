"""A pool of upstream workers serving one model: who is eligible, and who gets the next request.

Pure bookkeeping with an injected clock and random source, so every routing decision can
be tested deterministically; `serving.engine.upstream` does the HTTP and reports outcomes.

How a worker is chosen (`WorkerPool.pick`):

1. **Eligible** workers only: not draining (removed from discovery), last active health
   check passed, circuit not open. A circuit opens (the worker is *ejected*, as Envoy's
   outlier detection calls it) after ``consecutive_failures`` failed requests in a row, or
   at once when the worker refuses connections; it stays open for ``base_ejection_s`` times
   the number of ejections so far (capped), then half-opens: one request at a time until
   one succeeds. A passing active health check closes it early, so a restarted worker
   gets traffic again within one health interval.
2. **Not a latency outlier**: each worker keeps an EWMA of seconds per generated token;
   a worker measured ``min_samples`` times and slower than ``slow_factor`` times the fastest
   eligible one gets only a probe request, at most one every ``probe_interval_s`` and every
   ``probe_every`` requests (so probes stay under 1% of traffic); a probe's measurement
   replaces the estimate, so a worker misjudged during a stall is back after one probe.
   Least-outstanding alone
   would still give a 3x slower worker a third of a fast one's share, and every one of
   those requests lands in the pool's p99.
3. **Adapter affinity**: workers known to hold the request's LoRA adapter are preferred
   unless they are ``affinity_slack`` requests busier than the least loaded worker.
4. **Power of two choices** on load = outstanding requests (ours) + the worker's reported
   queue depth (vLLM's ``num_requests_waiting``, where scraped) + its KV-cache use times
   ``kv_cache_weight``, weighted by its speed (a
   worker not yet measured counts as the median one, so a newcomer gets its share).

When no worker is eligible the pool *panics* like Envoy: it routes among workers whose
health check passes (ejections ignored), else all members, rather than failing outright.

Retries (`WorkerPool.take_retry`) draw on a budget: at most ``retry_budget_ratio`` of the
requests in flight, but always ``retry_budget_min``, so a worker answering errors cannot
double the load on the others. Retries after a lost connection are not charged to it
(`UpstreamEngine._may_retry`): the lost worker's work ended with the connection.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import ErrorCode, ForgelineError

logger = logging.getLogger(__name__)


class Outcome(Enum):
    """How a request to a worker ended, as far as the worker's health is concerned."""

    OK = "ok"
    """The worker answered (a 4xx counts: the request was bad, not the worker)."""
    ERROR = "error"
    """5xx, a timeout or a broken stream: counts toward ejection."""
    REFUSED = "refused"
    """The connection was refused or reset before a byte came back: the worker is gone."""


class PoolPolicy(BaseModel):
    """How a pool judges and routes its workers (``serve.upstream_pool``); defaults suit LLM workers on a LAN."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consecutive_failures: int = Field(default=3, gt=0, description="Failed requests in a row (5xx, timeouts, broken streams) that eject a worker.")
    base_ejection_s: float = Field(default=5.0, gt=0, description="First ejection's length; the n-th lasts n times as long.")
    max_ejection_s: float = Field(default=300.0, gt=0, description="Longest ejection.")
    slow_factor: float = Field(default=1.5, gt=1, description="A worker this many times slower per token than the fastest gets only probes.")
    probe_interval_s: float = Field(default=1.0, gt=0, description="Least time between two probes of a slow worker.")
    probe_every: int = Field(default=200, gt=0, description="Least requests between two probes of a slow worker (keeps probes under 1%).")
    min_samples: int = Field(default=3, gt=0, description="Measured requests before a worker can be judged slow.")
    affinity_slack: int = Field(default=4, ge=0, description="How much busier a worker holding the adapter may be and still be preferred.")
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1, description="Retries in flight allowed, as a share of requests in flight.")
    retry_budget_min: int = Field(default=3, ge=0, description="Retries in flight always allowed.")
    max_attempts: int = Field(default=3, gt=0, description="Most workers one request is tried on.")
    kv_cache_weight: float = Field(default=4.0, ge=0, description="Load a full KV cache adds, in queued requests (a full cache preempts).")
    ewma_alpha: float = Field(default=0.3, gt=0, le=1, description="Weight of the newest measurement in a worker's speed estimate.")


@dataclass
class Worker:
    """One worker's routing state.

    Attributes:
        url: base URL, e.g. ``http://10.0.0.7:8000``.
        outstanding: requests this gateway has in flight on it.
        healthy: whether its last ``/health`` answered 200.
        consecutive_failures: failed requests since its last success.
        ejections: times its circuit opened (the next ejection lasts longer); decays on success.
        ejected_until: clock time its circuit stays open until.
        half_open: the circuit reopened for a trial: one request at a time until one succeeds.
        draining: removed from discovery; finishes its requests, gets no new ones.
        queue_depth: requests waiting in the worker's own queue, as it last reported.
        kv_cache_usage: share of its KV cache in use (0..1), as it last reported.
        seconds_per_token: EWMA of end-to-end seconds per generated token; None until measured.
        last_probe: clock time a latency outlier was last sent a probe request.
        last_probe_pick: the pool's pick count at that probe.
        probing: a probe request is out; its measurement replaces ``seconds_per_token``.
        samples: requests measured into ``seconds_per_token``.
        adapters: LoRA adapters it has served (so it holds them loaded).
        requests: requests sent to it, in total.
    """

    url: str
    outstanding: int = 0
    healthy: bool = True
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    half_open: bool = False
    draining: bool = False
    queue_depth: float = 0.0
    kv_cache_usage: float = 0.0
    seconds_per_token: float | None = None
    last_probe: float = float("-inf")
    last_probe_pick: int = -(10**9)
    probing: bool = False
    samples: int = 0
    adapters: set[str] = field(default_factory=set)
    requests: int = 0

    def ejected(self, now: float) -> bool:
        """Whether its circuit is open at ``now``."""
        return now < self.ejected_until


class NoWorkerError(ForgelineError):
    """No worker of the pool can take a request."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.UNAVAILABLE)


class WorkerPool:
    """The workers of one model and the routing decisions between them.

    Args:
        urls: the first members (more come and go through `set_members`).
        policy: thresholds and budgets.
        clock: monotonic seconds (tests pass a fake).
        rng: random source for the two choices (tests pass a seeded one).
        name: for logs and errors.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        policy: PoolPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        name: str = "pool",
    ) -> None:
        self.policy = policy or PoolPolicy()
        self.name = name
        self._clock = clock
        self._rng = rng or random.Random()
        self._workers: dict[str, Worker] = {}
        self._retries = 0
        self._picks = 0
        self.set_members(urls)

    # -- membership ----------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        """Every member, draining ones included."""
        return list(self._workers.values())

    def set_members(self, urls: Iterable[str]) -> None:
        """Make ``urls`` the pool: new ones join, missing ones drain (and leave once idle)."""
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        for url in wanted:
            worker = self._workers.get(url)
            if worker is None:
                self._workers[url] = Worker(url)
                logger.info("%s: worker %s joined", self.name, url)
            elif worker.draining:
                worker.draining = False
        for url, worker in list(self._workers.items()):
            if url not in wanted and not worker.draining:
                worker.draining = True
                logger.info("%s: worker %s left discovery; draining %d requests", self.name, url, worker.outstanding)
            self._forget_if_drained(worker)

    def _forget_if_drained(self, worker: Worker) -> None:
        if worker.draining and worker.outstanding == 0:
            self._workers.pop(worker.url, None)

    # -- routing -------------------------------------------------------------------------

    def eligible(self) -> list[Worker]:
        """Workers that may take a new request now (before latency and load are weighed)."""
        now = self._clock()
        return [
            w
            for w in self._workers.values()
            if not w.draining and w.healthy and not w.ejected(now) and not (w.half_open and w.outstanding > 0)
        ]

    def pick(self, adapter: str | None = None, exclude: Sequence[Worker] = ()) -> Worker:
        """The worker for the next request (see the module docstring for how).

        Args:
            adapter: the request's LoRA adapter, for affinity.
            exclude: workers already tried for this request.

        Raises:
            NoWorkerError: every member is excluded or draining.
        """
        now = self._clock()
        self._picks += 1
        skip = {id(w) for w in exclude}
        candidates = [w for w in self.eligible() if id(w) not in skip]
        if not candidates:
            # Panic routing: better a worker we doubt than a certain 503.
            live = [w for w in self._workers.values() if not w.draining and id(w) not in skip]
            candidates = [w for w in live if w.healthy] or live
            if not candidates:
                raise NoWorkerError(f"{self.name}: no worker can take the request ({len(self._workers)} members, {len(exclude)} tried)")
            return min(candidates, key=lambda w: (w.outstanding, w.ejected_until))
        candidates = self._without_slow(candidates, now)
        if len(candidates) == 1:
            return candidates[0]
        known = sorted(w.seconds_per_token for w in candidates if w.seconds_per_token is not None)
        typical = known[len(known) // 2] if known else 1.0
        if adapter is not None:
            holders = [w for w in candidates if adapter in w.adapters]
            least = min(self._load(w) for w in candidates)
            if holders and min(self._load(w) for w in holders) <= least + self.policy.affinity_slack:
                candidates = holders
                if len(candidates) == 1:
                    return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if self._score(a, typical) <= self._score(b, typical) else b

    def _without_slow(self, candidates: list[Worker], now: float) -> list[Worker]:
        measured = [w.seconds_per_token for w in candidates if w.seconds_per_token is not None]
        if len(measured) < 2:
            return candidates
        limit = min(measured) * self.policy.slow_factor
        slow = [
            w
            for w in candidates
            if w.seconds_per_token is not None and w.seconds_per_token > limit and w.samples >= self.policy.min_samples
        ]
        if not slow:
            return candidates
        for worker in slow:
            if (
                not worker.probing
                and now - worker.last_probe >= self.policy.probe_interval_s
                and self._picks - worker.last_probe_pick >= self.policy.probe_every
            ):
                worker.last_probe, worker.last_probe_pick, worker.probing = now, self._picks, True
                return [worker]
        return [w for w in candidates if w not in slow]

    def _load(self, worker: Worker) -> float:
        return worker.outstanding + worker.queue_depth + self.policy.kv_cache_weight * worker.kv_cache_usage

    def _score(self, worker: Worker, typical: float) -> float:
        # Expected wait: work ahead of us times how fast the worker gets through it.
        speed = worker.seconds_per_token if worker.seconds_per_token is not None else typical
        return (self._load(worker) + 1) * speed

    # -- outcomes ------------------------------------------------------------------------

    def begin(self, worker: Worker) -> None:
        """A request was sent to ``worker``."""
        worker.outstanding += 1
        worker.requests += 1

    def end(self, worker: Worker, outcome: Outcome, *, seconds: float = 0.0, tokens: int = 0, adapter: str | None = None) -> None:
        """A request to ``worker`` ended; updates its circuit, speed and adapters.

        Args:
            worker: where it went.
            outcome: how it ended.
            seconds: its duration, for the speed estimate (successes only).
            tokens: tokens it generated; with ``seconds`` gives seconds per token.
            adapter: the adapter it used (the worker now holds it).
        """
        worker.outstanding = max(0, worker.outstanding - 1)
        if outcome is Outcome.OK:
            worker.consecutive_failures = 0
            if worker.half_open:
                worker.half_open = False
                logger.info("%s: worker %s is back (circuit closed)", self.name, worker.url)
            if worker.ejections and self._clock() - worker.ejected_until > self.policy.max_ejection_s:
                worker.ejections -= 1  # a long good spell earns back shorter ejections
            if adapter is not None:
                worker.adapters.add(adapter)
            if seconds > 0 and tokens > 0:  # an error answer or an empty one says nothing about speed
                per_token = seconds / (tokens + 1)
                alpha = self.policy.ewma_alpha
                old = worker.seconds_per_token
                fresh = old is None or worker.probing
                worker.seconds_per_token = per_token if fresh else alpha * per_token + (1 - alpha) * old  # type: ignore[operator]
                worker.samples += 1
        else:
            worker.consecutive_failures += 1
            if outcome is Outcome.REFUSED or worker.half_open or worker.consecutive_failures >= self.policy.consecutive_failures:
                self._eject(worker, outcome)
        worker.probing = False  # a probe ends with whatever request ends next
        self._forget_if_drained(worker)

    def _eject(self, worker: Worker, outcome: Outcome) -> None:
        now = self._clock()
        if worker.ejected(now):
            return
        worker.ejections += 1
        duration = min(self.policy.base_ejection_s * worker.ejections, self.policy.max_ejection_s)
        worker.ejected_until = now + duration
        worker.half_open = True
        logger.warning(
            "%s: worker %s ejected for %.1f s (%s, %d failures in a row, ejection #%d)",
            self.name, worker.url, duration, outcome.value, worker.consecutive_failures, worker.ejections,
        )

    def health_checked(self, worker: Worker, ok: bool, *, queue_depth: float | None = None, kv_cache_usage: float | None = None) -> None:
        """Record an active health check (and the queue depth and KV-cache use it scraped, if any)."""
        if ok and not worker.healthy:
            logger.warning("%s: worker %s passes its health check again", self.name, worker.url)
        elif not ok and worker.healthy:
            logger.warning("%s: worker %s fails its health check", self.name, worker.url)
        worker.healthy = ok
        if ok and worker.ejected(self._clock()):
            # As Envoy's successful_active_health_check_uneject_host: the worker says it is
            # fine, so try it now (half-open) instead of waiting out the ejection.
            worker.ejected_until = 0.0
            worker.half_open = True
        if queue_depth is not None:
            worker.queue_depth = queue_depth
        if kv_cache_usage is not None:
            worker.kv_cache_usage = kv_cache_usage

    # -- retry budget --------------------------------------------------------------------

    def take_retry(self) -> bool:
        """Reserve one retry from the budget; False when it is spent. Pair with `end_retry`."""
        inflight = sum(w.outstanding for w in self._workers.values())
        allowed = max(self.policy.retry_budget_min, int(inflight * self.policy.retry_budget_ratio))
        if self._retries >= allowed:
            return False
        self._retries += 1
        return True

    def end_retry(self) -> None:
        """A retry taken with `take_retry` ended."""
        self._retries = max(0, self._retries - 1)
