"""Per-key token buckets: requests and tokens per minute, Retry-After, debt for completions."""

from __future__ import annotations

import asyncio

import pytest

from serving.gateway.quota import Limits, LocalLimiter, RateLimitedError, create_limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_refuses_past_the_burst_and_says_when_to_retry() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(rpm=2)

    async def scenario() -> None:
        await limiter.admit("k", limits, 10)
        await limiter.admit("k", limits, 10)
        with pytest.raises(RateLimitedError) as info:
            await limiter.admit("k", limits, 10)
        assert info.value.http_status == 429
        assert info.value.retry_after == pytest.approx(30.0)  # one request refills in 60/2 s
        assert info.value.retry_after_header == "30"
        assert "2 requests per minute" in info.value.message
        await limiter.admit("other", limits, 10)  # buckets are per key
        clock.now += 30
        await limiter.admit("k", limits, 10)

    asyncio.run(scenario())


def test_tpm_charges_prompt_up_front_and_completion_as_debt() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(tpm=600)  # 10 tokens per second

    async def scenario() -> None:
        await limiter.admit("k", limits, 100)
        await limiter.charge("k", limits, 600)  # completion drives the bucket to -100
        with pytest.raises(RateLimitedError) as info:
            await limiter.admit("k", limits, 50)
        assert info.value.retry_after == pytest.approx(15.0)  # (50 - -100) tokens at 10/s
        assert "tokens per minute" in info.value.message
        clock.now += 15
        await limiter.admit("k", limits, 50)

    asyncio.run(scenario())


def test_refused_admission_takes_nothing_and_oversize_prompts_are_explained() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(rpm=1, tpm=100)

    async def scenario() -> None:
        with pytest.raises(RateLimitedError) as info:
            await limiter.admit("k", limits, 500)
        assert info.value.retry_after is None and "Request too large" in info.value.message
        await limiter.admit("k", limits, 100)  # the refusal above consumed no request

    asyncio.run(scenario())


def test_unlimited_keys_are_never_refused_and_local_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGELINE_REDIS_URL", raising=False)
    limiter = create_limiter()
    assert isinstance(limiter, LocalLimiter)

    async def scenario() -> None:
        for _ in range(1000):
            await limiter.admit("k", Limits(), 10_000)

    asyncio.run(scenario())


def test_admission_reports_openais_ratelimit_headers() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(rpm=60, tpm=6000)

    async def scenario() -> None:
        assert await limiter.admit("free", Limits(), 10) is None  # no quotas, no headers
        await limiter.admit("k", limits, 1000)
        state = await limiter.admit("k", limits, 500)
        assert state is not None
        assert state.headers() == {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "58",
            "x-ratelimit-reset-requests": "2s",  # two requests refill at one a second
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-tokens": "4500",
            "x-ratelimit-reset-tokens": "15s",  # 1500 tokens at 100 a second
        }
        assert (await limiter.admit("t", Limits(tpm=6000), 10)).headers().keys() == {  # type: ignore[union-attr]
            "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
        }

    asyncio.run(scenario())
