"""Routing, ejection and retry budget of a worker pool, on a fake clock with seeded choices."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from serving.engine.discovery import DnsDiscovery
from serving.engine.pool import NoWorkerError, Outcome, PoolPolicy, WorkerPool

URLS = ["http://w0:8000", "http://w1:8000", "http://w2:8000"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(policy: PoolPolicy | None = None, urls: list[str] = URLS) -> tuple[WorkerPool, Clock]:
    clock = Clock()
    return WorkerPool(urls, policy=policy, clock=clock, rng=random.Random(7)), clock


def _by_url(pool: WorkerPool) -> dict[str, object]:
    return {w.url: w for w in pool.workers}


def test_least_outstanding_of_two_choices_spreads_load_evenly() -> None:
    pool, _ = _pool()
    for _ in range(30):
        pool.begin(pool.pick())
    # Each pick saw the load of the ones before: the spread stays within one or two requests.
    counts = [w.outstanding for w in pool.workers]
    assert sum(counts) == 30 and max(counts) - min(counts) <= 2


def test_queue_depth_reported_by_the_worker_counts_as_load() -> None:
    pool, _ = _pool(urls=URLS[:2])
    w0, w1 = pool.workers
    pool.health_checked(w0, True, queue_depth=50)
    assert {pool.pick().url for _ in range(20)} == {w1.url}


def test_refused_connection_ejects_at_once_and_a_passing_health_check_brings_it_back() -> None:
    pool, clock = _pool()
    dead = pool.workers[0]
    pool.begin(dead)
    pool.end(dead, Outcome.REFUSED)
    assert dead not in pool.eligible()
    assert all(pool.pick() is not dead for _ in range(50))
    # Still down: the health check fails, and nothing changes when the ejection runs out.
    pool.health_checked(dead, False)
    clock.now += 60
    assert dead not in pool.eligible()
    # Back: the next health check makes it eligible again, half-open (one request at a time).
    pool.health_checked(dead, True)
    assert dead in pool.eligible() and dead.half_open
    pool.begin(dead)
    assert dead not in pool.eligible()
    pool.end(dead, Outcome.OK, seconds=0.1, tokens=10)
    assert not dead.half_open and dead in pool.eligible()


def test_consecutive_errors_eject_for_longer_each_time() -> None:
    pool, clock = _pool(PoolPolicy(consecutive_failures=3, base_ejection_s=5.0))
    flaky = pool.workers[1]
    for _ in range(2):
        pool.begin(flaky)
        pool.end(flaky, Outcome.ERROR)
    assert flaky in pool.eligible()  # two failures are below the threshold
    pool.begin(flaky)
    pool.end(flaky, Outcome.ERROR)
    assert flaky.ejected_until == clock.now + 5.0
    clock.now += 5.0
    # Half-open trial fails: ejected again, now for twice as long.
    assert flaky in pool.eligible() and flaky.half_open
    pool.begin(flaky)
    pool.end(flaky, Outcome.ERROR)
    assert flaky.ejected_until == clock.now + 10.0
    # A success in between resets the count.
    healthy = pool.workers[2]
    for outcome in (Outcome.ERROR, Outcome.ERROR, Outcome.OK, Outcome.ERROR, Outcome.ERROR):
        pool.begin(healthy)
        pool.end(healthy, outcome)
    assert healthy in pool.eligible()


def test_a_slow_worker_gets_only_probes() -> None:
    pool, clock = _pool(PoolPolicy(slow_factor=2.0, probe_interval_s=1.0, probe_every=200))
    fast_a, fast_b, slow = pool.workers
    for worker, seconds in ((fast_a, 1.0), (fast_b, 1.0), (slow, 3.0)):
        pool.begin(worker)
        pool.end(worker, Outcome.OK, seconds=seconds, tokens=15)
    # One slow answer is no verdict (a stall on a shared machine looks the same).
    held = []
    for _ in range(30):
        held.append(pool.pick())
        pool.begin(held[-1])
    assert slow in held
    for worker in held:
        pool.end(worker, Outcome.OK)
    for _ in range(2):
        pool.begin(slow)
        pool.end(slow, Outcome.OK, seconds=3.0, tokens=15)
    picks: Counter[str] = Counter()

    def pick() -> None:
        worker = pool.pick()
        picks[worker.url] += 1
        if worker is slow:  # the probe comes back as slow as ever
            pool.begin(slow)
            pool.end(slow, Outcome.OK, seconds=3.0, tokens=15)

    for _ in range(1000):
        clock.now += 0.01  # 100 requests per second for 10 s
        pick()
    # A probe a second but only every 200 requests: 5 of 1000, far below its 1/7 share of the capacity.
    assert picks[slow.url] == 5
    # At a higher request rate the time limit binds: a probe a second.
    for _ in range(2000):
        clock.now += 0.001
        pick()
    assert picks[slow.url] == 5 + 2
    # It recovers: one fast probe is enough to get its share back.
    clock.now += 1.0
    for _ in range(200):
        pool.pick()
    assert slow.probing
    pool.begin(slow)
    pool.end(slow, Outcome.OK, seconds=1.0, tokens=15)
    picked = []
    for _ in range(30):
        picked.append(pool.pick())
        pool.begin(picked[-1])
    assert slow in picked


def test_adapter_affinity_prefers_workers_holding_the_adapter_until_they_are_much_busier() -> None:
    pool, _ = _pool(PoolPolicy(affinity_slack=4))
    holder = pool.workers[2]
    pool.begin(holder)
    pool.end(holder, Outcome.OK, adapter="support")
    assert {pool.pick("support").url for _ in range(20)} == {holder.url}
    for _ in range(5):
        pool.begin(holder)
    assert holder not in [pool.pick("support") for _ in range(20)]


def test_a_worker_not_measured_yet_counts_as_a_typical_one() -> None:
    pool, _ = _pool()
    for worker in pool.workers[:2]:
        pool.begin(worker)
        pool.end(worker, Outcome.OK, seconds=0.5, tokens=9)
    newcomer = pool.workers[2]
    picked = []
    for _ in range(30):
        picked.append(pool.pick())
        pool.begin(picked[-1])
    assert 7 <= picked.count(newcomer) <= 13


def test_removed_workers_drain_then_leave_and_new_ones_join() -> None:
    pool, _ = _pool()
    leaving = pool.workers[0]
    pool.begin(leaving)
    pool.set_members(URLS[1:] + ["http://w3:8000"])
    assert leaving.draining and leaving in pool.workers
    assert all(pool.pick() is not leaving for _ in range(50))
    pool.end(leaving, Outcome.OK)
    assert sorted(w.url for w in pool.workers) == sorted(URLS[1:] + ["http://w3:8000"])


def test_panic_routing_when_every_worker_is_ejected_and_an_error_when_all_were_tried() -> None:
    pool, _ = _pool(urls=URLS[:2])
    for worker in pool.workers:
        pool.begin(worker)
        pool.end(worker, Outcome.REFUSED)
    assert pool.eligible() == []
    first = pool.pick()  # a doubtful worker beats a certain 503
    with pytest.raises(NoWorkerError):
        pool.pick(exclude=pool.workers)
    assert first in pool.workers


def test_retry_budget_is_a_share_of_requests_in_flight_with_a_floor() -> None:
    pool, _ = _pool(PoolPolicy(retry_budget_ratio=0.2, retry_budget_min=2))
    assert [pool.take_retry() for _ in range(3)] == [True, True, False]
    for _ in range(50):
        pool.begin(pool.pick())
    assert pool.take_retry()  # 50 in flight: 10 retries allowed, 3 taken
    pool.end_retry()
    pool.end_retry()
    pool.end_retry()
    assert sum(pool.take_retry() for _ in range(20)) == 10


def test_dns_discovery_follows_the_names_addresses_and_survives_a_failed_lookup() -> None:
    answers: list[list[str] | OSError] = [["10.0.0.2", "10.0.0.1"], OSError("SERVFAIL"), ["10.0.0.3", "fd00::7"]]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("workers.models.svc", 8000)
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    discovery = DnsDiscovery("http://workers.models.svc:8000", resolver=resolver)

    async def three() -> list[list[str]]:
        return [await discovery() for _ in range(3)]

    first, during_outage, later = asyncio.run(three())
    assert first == ["http://10.0.0.2:8000", "http://10.0.0.1:8000"]
    assert during_outage == first
    assert later == ["http://10.0.0.3:8000", "http://[fd00::7]:8000"]
