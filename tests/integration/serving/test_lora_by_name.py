"""A running gateway answers fine-tuned LoRA versions by their own name on a served base.

Real MLflow registry (SQLite), real uvicorn gateway built by `build_gateway(..., bases=...)`,
real keys, the stock ``openai`` SDK. Versions are registered and promoted while the gateway
runs: nothing restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from mlflow import MlflowClient

from registry import lineage
from registry.audit import AuditLog
from registry.client import Registry
from registry.keys import KeyStore
from serving.adapter_routes import AdapterRoutes
from serving.config import ServeSpec
from serving.gateway.server import serve_in_background
from serving.registry_models import BASE_VERSION, BaseSource, base_artifact_dir
from serving.service import build_gateway

pytestmark = pytest.mark.integration

BASE = "tiny-base"
TTL_S = 0.5  # the gateway's poll interval: how long a name lookup is trusted
PROMPT = "Hello world"


@dataclass
class Setup:
    base_url: str
    registry: Registry
    keys: KeyStore
    base_dir: Path
    adapters: dict[str, Path]
    home: Path

    def client(self, org: str) -> openai.OpenAI:
        secret, _ = self.keys.create(f"{org}-app", org=org)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=secret, max_retries=0, timeout=60)

    def register(self, name: str, adapter: str, *, org: str | None = "acme", base: str | None = None) -> int:
        tags = {lineage.ADAPTER: "lora", lineage.BASE_MODEL: base or str(self.base_dir)}
        if org is not None:
            tags[lineage.ORG] = org
        return self.registry.create_version(name, source=str(self.adapters[adapter]), run_id=None, tags=tags).version

    def promote(self, name: str, version: int) -> None:
        self.registry.move_alias(name, "production", version, actor="test", reason="fine-tune ready")


@pytest.fixture(scope="module")
def setup(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("lora-by-name")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # migrate the schema once
    registry = Registry(tracking_uri=uri, audit=AuditLog(f"sqlite:///{root / 'control.db'}"))
    keys = KeyStore(f"sqlite:///{root / 'keys.db'}")
    spec = ServeSpec(auth=True, device="cpu", poll_interval_s=TTL_S, max_new_tokens=32, key_cache_s=0.2)
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped, so the per-test $FORGELINE_HOME is not there yet: give the base cache its own.
        mp.setenv("FORGELINE_HOME", str(root / "home"))
        app = build_gateway(registry, [], spec, keys=keys, bases=[BaseSource(BASE, str(tiny_base))])
        base_url, stop = serve_in_background(app)
        try:
            yield Setup(base_url, registry, keys, tiny_base, tiny_adapters, root / "home")
        finally:
            stop()
            keys.dispose()
            registry.close()


def _complete(client: openai.OpenAI, model: str) -> tuple[str, dict[str, str]]:
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    return raw.parse().choices[0].text, dict(raw.headers)


def _eventually(check: Callable[[], Any], *, within_s: float) -> Any:
    """``check()``'s result once it stops raising; the last error after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return check()
        except (openai.NotFoundError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_base_is_built_once_and_served_bare(setup: Setup) -> None:
    client = setup.client("acme")
    text, headers = _complete(client, BASE)
    assert text and headers["x-forgeline-model-version"] == f"{BASE}/{BASE_VERSION}"
    assert "x-forgeline-adapter" not in headers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGELINE_HOME", str(setup.home))
        assert headers["x-forgeline-engine-artifact"] == str(base_artifact_dir(BASE))
        assert (base_artifact_dir(BASE) / "forgeline-engine.json").is_file()
    assert [m.id for m in client.models.list().data] == [BASE]


def test_a_lora_registered_after_start_answers_by_its_name_and_follows_promotion(setup: Setup) -> None:
    acme = setup.client("acme")
    name = "ft-acme-tiny-base-support"
    base_text, _ = _complete(acme, BASE)
    v1 = setup.register(name, "a")
    # Registered but not promoted: a bare name means its production version, which is not there yet.
    with pytest.raises(openai.NotFoundError) as err:
        _complete(acme, name)
    assert err.value.code == "model_not_found"

    setup.promote(name, v1)
    t0 = time.monotonic()
    v1_text, headers = _eventually(lambda: _complete(acme, name), within_s=TTL_S + 3)
    assert time.monotonic() - t0 < TTL_S + 3
    assert headers["x-forgeline-adapter"] == f"{name}@{v1}"
    assert headers["x-forgeline-model-version"] == f"{BASE}/{BASE_VERSION}"
    assert v1_text != base_text, "the adapter must steer the base"
    assert acme.models.retrieve(name).id == name
    # The same adapter through the explicit ``base:ref`` form answers the same.
    explicit_text, explicit = _complete(acme, f"{BASE}:{name}")
    assert (explicit_text, explicit["x-forgeline-adapter"]) == (v1_text, f"{name}@{v1}")

    v2 = setup.register(name, "b")
    setup.promote(name, v2)

    def moved() -> tuple[str, dict[str, str]]:
        text, headers = _complete(acme, name)
        assert headers["x-forgeline-adapter"] == f"{name}@{v2}"
        return text, headers

    v2_text, _ = _eventually(moved, within_s=TTL_S + 3)
    assert v2_text != v1_text
    # The pinned version stays reachable by its pinned name.
    pinned_text, pinned = _complete(acme, f"{name}@{v1}")
    assert (pinned_text, pinned["x-forgeline-adapter"]) == (v1_text, f"{name}@{v1}")


def test_another_organisations_lora_does_not_exist_for_its_keys(setup: Setup) -> None:
    name = "ft-acme-tiny-base-private"
    setup.promote(name, setup.register(name, "a"))
    acme, globex = setup.client("acme"), setup.client("globex")
    _eventually(lambda: _complete(acme, name), within_s=TTL_S + 3)
    for model in (name, f"{name}@1", f"{BASE}:{name}", f"{BASE}:{name}@1"):
        with pytest.raises(openai.NotFoundError) as err:
            _complete(globex, model)
        assert err.value.code == "model_not_found", model
        # The generic answer, exactly as for a name that does not exist: nothing about the owner leaks.
        assert err.value.message.endswith(f"The model `{model}` does not exist or you do not have access to it.")
    with pytest.raises(openai.NotFoundError):
        globex.models.retrieve(name)
    # A LoRA owned by no organisation is every key's.
    shared = "tiny-base-shared"
    setup.promote(shared, setup.register(shared, "b", org=None))
    _, headers = _eventually(lambda: _complete(globex, shared), within_s=TTL_S + 3)
    assert headers["x-forgeline-adapter"] == f"{shared}@1"


def test_unknown_names_and_loras_of_another_base_are_404(setup: Setup) -> None:
    acme = setup.client("acme")
    other = "ft-acme-other-base"
    setup.promote(other, setup.register(other, "a", base="/models/some-other-base"))
    time.sleep(TTL_S)  # any earlier lookup of these names has expired
    for model in ("no-such-model", "no-such-model@3", other, f"{BASE}:no-such-model", f"{BASE}:{other}"):
        with pytest.raises(openai.NotFoundError) as err:
            _complete(acme, model)
        assert err.value.code == "model_not_found", model
    # A non-LoRA version is no adapter either.
    full = "tiny-full"
    setup.registry.create_version(
        full,
        source=str(setup.base_dir),
        run_id=None,
        tags={lineage.ADAPTER: "none", lineage.BASE_MODEL: str(setup.base_dir)},
    )
    setup.promote(full, 1)
    with pytest.raises(openai.NotFoundError):
        _complete(acme, full)


def test_lookups_are_cached_for_the_ttl_negative_ones_too(setup: Setup) -> None:
    now = [0.0]
    routes = AdapterRoutes(setup.registry, ttl_s=10, clock=lambda: now[0])
    name = "tiny-base-cached"
    assert routes.lookup(name) is None  # unknown: remembered as unknown
    setup.promote(name, setup.register(name, "a"))
    now[0] = 9.0
    assert routes.lookup(name) is None
    now[0] = 10.5
    info = routes.lookup(name)
    assert info is not None and info.version == 1
    setup.promote(name, setup.register(name, "b"))
    now[0] = 15.0
    assert routes.lookup(name).version == 1  # type: ignore[union-attr]
    now[0] = 21.0
    assert routes.lookup(name).version == 2  # type: ignore[union-attr]
