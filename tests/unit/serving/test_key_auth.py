"""`KeyAuth`: a key's lookups in the store, cached and never more than one at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime

import pytest

from registry.errors import AuthenticationError
from registry.keys import KeyRecord
from serving.gateway.auth import KeyAuth


class SlowStore:
    """A store whose lookups take a while (a database behind it) and are counted."""

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.calls = 0
        self._lock = threading.Lock()

    def verify(self, secret: str) -> KeyRecord:
        with self._lock:
            self.calls += 1
        time.sleep(0.05)
        if secret != "fl-good-secret":
            raise AuthenticationError("invalid API key", param="api_key")
        return self.record


def _record() -> KeyRecord:
    return KeyRecord(id="k1", name="k", prefix="fl-good", roles=("user",), org="default", models="*", rpm=None, tpm=None,
                     expires_at=None, revoked_at=None, created_at=datetime.now(UTC))  # fmt: skip


def test_requests_that_miss_together_share_one_lookup_and_one_refusal() -> None:
    async def main() -> None:
        store = SlowStore(_record())
        auth = KeyAuth(store, cache_s=60)
        records = await asyncio.gather(*(auth.authenticate("Bearer fl-good-secret") for _ in range(16)))
        assert {r.id for r in records} == {"k1"} and store.calls == 1
        await auth.authenticate("Bearer fl-good-secret")  # cached
        assert store.calls == 1
        refused = await asyncio.gather(*(auth.authenticate("Bearer fl-bad-secret") for _ in range(8)), return_exceptions=True)
        assert all(isinstance(r, AuthenticationError) for r in refused) and store.calls == 2
        # A waiter that leaves does not take the lookup with it; the next miss starts a new one.
        leaving = asyncio.ensure_future(auth.authenticate("Bearer fl-bad-secret"))
        staying = asyncio.ensure_future(auth.authenticate("Bearer fl-bad-secret"))
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(AuthenticationError):
            await staying
        assert store.calls == 3

    asyncio.run(main())
