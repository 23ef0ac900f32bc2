"""A flood of random model names costs no registry lookup each, and cannot evict real entries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.client import Registry
from serving import adapter_routes
from serving.adapter_routes import AdapterRoutes


class Counting:
    """Counts the registry calls made through it (the registry itself is real)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.resolves = 0
        self.lists = 0

    def resolve(self, ref: str):  # noqa: ANN201 - passes the real result through
        self.resolves += 1
        return self.registry.resolve(ref)

    def list_models(self) -> list[str]:
        self.lists += 1
        return self.registry.list_models()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    home = tmp_path_factory.mktemp("adapter-routes")
    with pytest.MonkeyPatch.context() as patch:  # one registry for the module: creating one takes seconds
        patch.setenv("FORGELINE_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL"):
            patch.delenv(var, raising=False)
        registry = Registry()
        (home / "weights").mkdir()
        registry.create_version("ft-known", source=str(home / "weights"), run_id=None, tags={})
        registry.move_alias("ft-known", "production", 1, actor="test", reason="test")
        yield registry
        registry.close()


def test_random_names_are_answered_from_the_list_of_registered_models(registry: Registry) -> None:
    counting = Counting(registry)
    routes = AdapterRoutes(counting, ttl_s=60)  # type: ignore[arg-type]

    async def flood() -> None:
        await asyncio.gather(*(routes.prepare(f"random-{uuid.uuid4().hex}", {}) for _ in range(600)))

    asyncio.run(flood())
    assert counting.resolves == 0 and counting.lists == 1
    assert routes.lookup("ft-known") is not None and counting.resolves == 1  # real names still resolve
    assert routes.lookup("ft-known@production") is not None
    assert routes.lookup(f"random-{uuid.uuid4().hex}") is None and counting.resolves == 2


def test_a_model_registered_later_is_found_after_the_ttl(registry: Registry, tmp_path: Path) -> None:
    now = [0.0]
    routes = AdapterRoutes(registry, ttl_s=10, clock=lambda: now[0])
    assert routes.lookup("ft-later") is None
    tmp_path.joinpath("weights").mkdir()
    registry.create_version("ft-later", source=str(tmp_path / "weights"), run_id=None, tags={})
    registry.move_alias("ft-later", "production", 1, actor="test", reason="test")
    now[0] = 5.0
    assert routes.lookup("ft-later") is None  # the cached name list is trusted for the TTL
    now[0] = 10.5
    assert routes.lookup("ft-later") is not None


def test_the_cache_evicts_the_least_recently_used(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_routes, "MAX_CACHED", 3)
    routes = AdapterRoutes(registry, ttl_s=60)
    for ref in ("ft-known", "ft-known@production", "ft-known@1"):
        routes.lookup(ref)
    routes.lookup("ft-known")  # used again: now the most recent
    routes.lookup("ft-known@latest")
    assert set(routes._cache) == {"ft-known", "ft-known@1", "ft-known@latest"}
