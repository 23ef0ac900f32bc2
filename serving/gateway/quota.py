"""Per-key quotas: requests per minute and tokens per minute, as token buckets.

Each key has two buckets that refill continuously: ``rpm`` requests and ``tpm`` tokens
per minute, each holding at most one minute's worth (so a key may burst a full minute's
quota, then continues at the refill rate). A request is admitted when its request bucket
holds one request and its token bucket holds its prompt tokens; both are taken
together or not at all. Completion tokens are charged when the response ends and may
drive the token bucket negative: the key then waits until it has paid them back, so
``prompt + completion`` tokens per minute hold on average without guessing the length
of a completion up front.

Two limiters share one interface: `LocalLimiter` (one process) and `RedisLimiter` (every
gateway replica pointed at the same Redis shares the buckets; the arithmetic runs in a
Lua script on Redis's clock, so replicas need no clock agreement).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from registry.errors import ErrorCode, ForgelineError, MissingDependencyError

logger = logging.getLogger(__name__)

REDIS_URL_ENV = "FORGELINE_REDIS_URL"


@dataclass(frozen=True)
class Limits:
    """One key's quotas; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None


@dataclass(frozen=True)
class QuotaState:
    """A key's buckets right after a request was admitted: OpenAI's ``x-ratelimit-*`` headers.

    Attributes:
        limits: the key's quotas.
        requests_left: whole requests left in the ``rpm`` bucket (None: no ``rpm``).
        tokens_left: tokens left in the ``tpm`` bucket (None: no ``tpm``; may be < 0 in debt).
    """

    limits: Limits
    requests_left: float | None = None
    tokens_left: float | None = None

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; reset is when the bucket is full again."""
        out: dict[str, str] = {}
        for kind, cap, left in (("requests", self.limits.rpm, self.requests_left), ("tokens", self.limits.tpm, self.tokens_left)):
            if cap is None or left is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(cap)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(left)))
            out[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, (cap - left) * 60.0 / cap):.3g}s"
        return out


class RateLimitedError(ForgelineError):
    """A key is over its quota (HTTP 429); ``retry_after`` says when to come back, in seconds."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float | None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str | None:
        """The ``Retry-After`` value: whole seconds, rounded up (at least 1)."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


class Limiter(Protocol):
    """Admits requests against per-key buckets and charges tokens afterwards."""

    async def admit(self, key: str, limits: Limits, prompt_tokens: int) -> QuotaState | None:
        """Take one request and ``prompt_tokens`` tokens, or raise `RateLimitedError`.

        Returns:
            The buckets after taking them, or None for a key without quotas.
        """
        ...

    async def charge(self, key: str, limits: Limits, tokens: int) -> None:
        """Take ``tokens`` more tokens (completion tokens), even into debt; nothing without a ``tpm``
        (the gateway does not call it then)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _refused(limits: Limits, prompt_tokens: int, rpm_wait: float, tpm_wait: float) -> RateLimitedError:
    if limits.tpm is not None and prompt_tokens > limits.tpm:
        return RateLimitedError(
            f"Request too large: the prompt has {prompt_tokens} tokens but this API key allows "
            f"{limits.tpm} tokens per minute; shorten the prompt or ask for a higher `tpm`",
            retry_after=None,
            param="messages",
        )
    if rpm_wait >= tpm_wait:
        return RateLimitedError(
            f"Rate limit reached: this API key allows {limits.rpm} requests per minute; "
            f"retry in {max(rpm_wait, 0.001):.1f} s",
            retry_after=rpm_wait,
        )
    return RateLimitedError(
        f"Rate limit reached: this API key allows {limits.tpm} tokens per minute (prompt + completion); "
        f"retry in {tpm_wait:.1f} s",
        retry_after=tpm_wait,
    )


@dataclass
class _Bucket:
    level: float
    stamp: float

    def refill(self, capacity: float, now: float) -> None:
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now

    def wait_for(self, cost: float, capacity: float) -> float:
        """Seconds until ``cost`` fits (0 when it fits now)."""
        return 0.0 if self.level >= cost else (cost - self.level) * 60.0 / capacity


class LocalLimiter:
    """Token buckets in this process (the default; one gateway replica)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, key: str, kind: str, capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = _Bucket(float(capacity), now)
        bucket.refill(capacity, now)
        return bucket

    async def admit(self, key: str, limits: Limits, prompt_tokens: int) -> QuotaState | None:
        """Take one request and ``prompt_tokens`` tokens, or raise `RateLimitedError`."""
        if limits.unlimited:
            return None
        with self._lock:
            now = self._clock()
            rpm = self._bucket(key, "rpm", limits.rpm, now) if limits.rpm is not None else None
            tpm = self._bucket(key, "tpm", limits.tpm, now) if limits.tpm is not None else None
            rpm_wait = rpm.wait_for(1, limits.rpm) if rpm is not None and limits.rpm is not None else 0.0
            tpm_wait = tpm.wait_for(prompt_tokens, limits.tpm) if tpm is not None and limits.tpm is not None else 0.0
            if rpm_wait > 0 or tpm_wait > 0 or (limits.tpm is not None and prompt_tokens > limits.tpm):
                raise _refused(limits, prompt_tokens, rpm_wait, tpm_wait)
            if rpm is not None:
                rpm.level -= 1
            if tpm is not None:
                tpm.level -= prompt_tokens
            return QuotaState(limits, rpm.level if rpm is not None else None, tpm.level if tpm is not None else None)

    async def charge(self, key: str, limits: Limits, tokens: int) -> None:
        """Take ``tokens`` more tokens, even into debt."""
        if limits.tpm is None or tokens <= 0:
            return
        with self._lock:
            self._bucket(key, "tpm", limits.tpm, self._clock()).level -= tokens

    async def close(self) -> None:
        """Nothing to release."""


# KEYS: rpm bucket, tpm bucket. ARGV: rpm (0 = none), tpm (0 = none), request cost, token cost,
# mode ("admit" takes both or neither; "charge" takes tokens into debt). Returns
# {rpm_wait, tpm_wait, rpm_level, tpm_level} as strings (Lua numbers become integers when
# returned to Redis); the levels are after an admitted request.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function load(key, cap)
  local b = redis.call('HMGET', key, 'level', 'stamp')
  local level = tonumber(b[1]) or cap
  local stamp = tonumber(b[2]) or now
  return math.min(cap, level + math.max(0, now - stamp) * cap / 60)
end
local function store(key, cap, level)
  redis.call('HSET', key, 'level', tostring(level), 'stamp', tostring(now))
  redis.call('EXPIRE', key, 120 + math.ceil(math.max(0, -level) * 60 / cap))
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local req_cost, tok_cost = tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] == 'charge' then
  if tpm > 0 then store(KEYS[2], tpm, load(KEYS[2], tpm) - tok_cost) end
  return {'0', '0', '0', '0'}
end
local rl, tl = 0, 0
local rw, tw = 0, 0
if rpm > 0 then
  rl = load(KEYS[1], rpm)
  if rl < req_cost then rw = (req_cost - rl) * 60 / rpm end
end
if tpm > 0 then
  tl = load(KEYS[2], tpm)
  if tl < tok_cost then tw = (tok_cost - tl) * 60 / tpm end
end
if rw == 0 and tw == 0 then
  rl, tl = rl - req_cost, tl - tok_cost
  if rpm > 0 then store(KEYS[1], rpm, rl) end
  if tpm > 0 then store(KEYS[2], tpm, tl) end
end
return {tostring(rw), tostring(tw), tostring(rl), tostring(tl)}
"""


class RedisLimiter:
    """Token buckets in Redis, shared by every gateway replica that uses the same URL.

    Args:
        url: ``redis://host:port/db``.
        prefix: key namespace, so several deployments can share one Redis.
    """

    def __init__(self, url: str, *, prefix: str = "forgeline:quota") -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise MissingDependencyError(
                "Redis-backed quotas need the redis client: pip install 'forgeline[redis]'", param="redis_url"
            ) from exc
        self.url = url
        self._prefix = prefix
        self._client = aioredis.Redis.from_url(url)
        self._script = self._client.register_script(_SCRIPT)

    def _keys(self, key: str) -> list[str]:
        # A hash tag keeps both buckets of a key on one Redis Cluster slot (scripts need that).
        return [f"{self._prefix}:{{{key}}}:rpm", f"{self._prefix}:{{{key}}}:tpm"]

    async def _run(self, key: str, limits: Limits, tokens: int, mode: str) -> tuple[float, float, float, float]:
        from redis.exceptions import RedisError

        try:
            result = await self._script(
                keys=self._keys(key), args=[limits.rpm or 0, limits.tpm or 0, 1, tokens, mode]
            )
        except RedisError as exc:
            raise ForgelineError(
                f"the quota store at {self.url} is unreachable ({exc}); check FORGELINE_REDIS_URL",
                code=ErrorCode.UNAVAILABLE,
            ) from exc
        return float(result[0]), float(result[1]), float(result[2]), float(result[3])

    async def admit(self, key: str, limits: Limits, prompt_tokens: int) -> QuotaState | None:
        """Take one request and ``prompt_tokens`` tokens, or raise `RateLimitedError`."""
        if limits.unlimited:
            return None
        if limits.tpm is not None and prompt_tokens > limits.tpm:
            raise _refused(limits, prompt_tokens, 0.0, 0.0)
        rpm_wait, tpm_wait, rpm_left, tpm_left = await self._run(key, limits, prompt_tokens, "admit")
        if rpm_wait > 0 or tpm_wait > 0:
            raise _refused(limits, prompt_tokens, rpm_wait, tpm_wait)
        return QuotaState(limits, rpm_left if limits.rpm is not None else None, tpm_left if limits.tpm is not None else None)

    async def charge(self, key: str, limits: Limits, tokens: int) -> None:
        """Take ``tokens`` more tokens, even into debt."""
        if limits.tpm is None or tokens <= 0:
            return
        await self._run(key, limits, tokens, "charge")

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def create_limiter(redis_url: str | None = None) -> Limiter:
    """`RedisLimiter` when a URL is given or ``FORGELINE_REDIS_URL`` is set, else `LocalLimiter`."""
    url = redis_url or os.environ.get(REDIS_URL_ENV)
    if url:
        logger.info("quotas shared through Redis at %s", url.rsplit("@", 1)[-1])
        return RedisLimiter(url)
    return LocalLimiter()
