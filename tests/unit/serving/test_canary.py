"""Canary traffic split and SLO verdicts."""

from __future__ import annotations

from serving.canary import Canary
from serving.config import CanarySLO, CanarySpec
from serving.gateway.catalog import ServedModel
from tests.support.engines import StubEngine


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _canary(percent: float, slo: CanarySLO, clock: Clock) -> Canary:
    base = ServedModel(name="m", version="1", engine=StubEngine())
    cand = ServedModel(name="m@staging", version="2", engine=StubEngine())
    return Canary("m", cand, base, CanarySpec(percent=percent, slo=slo), clock)


def test_split_is_exactly_the_configured_share() -> None:
    canary = _canary(10, CanarySLO(), Clock())
    taken = [canary.take() for _ in range(100)]
    assert sum(taken) == 10
    assert taken[:10].count(True) == 1  # spread out, not bunched at the end
    quarter = _canary(25, CanarySLO(), Clock())
    assert sum(quarter.take() for _ in range(40)) == 10


def test_error_rate_breach_needs_min_requests_and_trips_once() -> None:
    clock = Clock()
    canary = _canary(50, CanarySLO(error_rate=0.2, min_requests=5, window=30), clock)
    verdicts = [canary.record(True, 0.01) for _ in range(4)]
    assert verdicts == [None] * 4  # not judged before min_requests
    verdict = canary.record(False, 0.01)
    assert verdict is not None and verdict.breached
    assert verdict.errors == 4 and verdict.requests == 5
    assert "error rate" in verdict.reason
    assert canary.record(True, 0.01) is None  # already tripped


def test_latency_breach_and_window_expiry() -> None:
    clock = Clock()
    canary = _canary(50, CanarySLO(error_rate=1.0, p95_latency_ms=100, min_requests=3, window=10), clock)
    for _ in range(2):
        assert canary.record(False, 0.5) is None
    clock.now += 11  # those two leave the window
    for _ in range(2):
        assert canary.record(False, 0.05) is None
    assert not canary.verdict().breached
    verdict = canary.record(False, 0.5)
    assert verdict is not None and "p95 latency" in verdict.reason
