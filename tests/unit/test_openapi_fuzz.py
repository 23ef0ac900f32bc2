"""Property-based fuzzing of both servers' OpenAPI specs (schemathesis on hypothesis).

Every operation of the control plane and the gateway gets valid and invalid requests
generated from its own OpenAPI schema, in-process over ASGI with real state: a SQLite
registry with a registered version for the control plane, the tiny torch model for the
gateway, and valid API keys on both. Each response must be below 500 and match what the
spec documents (status code, content type, body schema).

The budget is bounded (``FUZZ_EXAMPLES`` per operation and seed) and runs twice: with a
fixed seed, so a regression reproduces, and with a fresh random one, printed, so every run
also explores something new. Reproduce a failure with ``FORGELINE_FUZZ_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz tests need the dev extra (schemathesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as fixed_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

FIXED_SEED = 20261201
FUZZ_EXAMPLES = int(os.environ.get("FORGELINE_FUZZ_EXAMPLES", "30"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _seeds() -> list[int]:
    pinned = os.environ.get("FORGELINE_FUZZ_SEED")
    if pinned:
        return [int(pinned)]
    return [FIXED_SEED, random.SystemRandom().randrange(2**32)]


SEEDS = _seeds()


@dataclass
class Target:
    app: Any
    secret: str
    known: dict[str, Any]  # path parameters of resources that exist, so fuzzing reaches past 404


def _fuzz(target: Target, seed: int) -> list[str]:
    """Run every operation of ``target``'s spec; return one line per failing request."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    headers = {"Authorization": f"Bearer {target.secret}"}
    failures: list[str] = []
    for result in schema.get_all_operations():
        failures += _fuzz_operation(result.ok(), target, headers, seed)
    return failures


def _fuzz_operation(operation: Any, target: Target, headers: dict[str, str], seed: int) -> list[str]:
    known = {k: v for k, v in target.known.items() if f"{{{k}}}" in operation.path}
    strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    if known:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
    if "model" in target.known and operation.method.upper() == "POST":
        # Valid bodies naming the served model, so generation itself gets fuzzed too.
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE).map(_naming(target.known["model"])))
    failures: list[str] = []

    @fixed_seed(seed)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(headers=headers, checks=CHECKS)
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report all
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:600]}\n    {case!r}"[:1200])
            raise

    try:
        run()
    except Exception:  # noqa: BLE001 - recorded above (hypothesis re-raises the shrunk example)
        pass
    return failures


def _naming(model: str) -> Any:
    def with_model(case: Any) -> Any:
        if isinstance(case.body, dict):
            case.body = {**case.body, "model": model}
        return case

    return with_model


def _shutdown_lifespans() -> None:
    # schemathesis keeps each app's lifespan running for the process; stop ours (engines) now.
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def fuzz_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One $FORGELINE_HOME for the module's long-lived apps (the autouse one is per test)."""
    home = tmp_path_factory.mktemp("fuzz-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGELINE_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL"):
            patch.delenv(var, raising=False)
        yield home


@pytest.fixture(scope="module")
def control_target(fuzz_home: Path) -> Iterator[Target]:
    from forgeline.control import create_control_app
    from registry.client import Registry
    from registry.keys import KeyStore
    registry = Registry()
    keys = KeyStore()
    (fuzz_home / "weights").mkdir()
    registry.create_version("fuzzed", source=str(fuzz_home / "weights"), run_id=None, tags={})
    secret = keys.create("fuzz-admin", roles=("admin",))[0]
    app = create_control_app(registry=registry, keys=keys, supervise=False)
    yield Target(app, secret, {"name": "fuzzed", "version": 1, "alias": "production"})
    _shutdown_lifespans()
    registry.close()
    keys.dispose()


@pytest.fixture(scope="module")
def gateway_target(fuzz_home: Path, tiny_artifact: Path) -> Iterator[Target]:
    from registry.keys import KeyStore
    from serving.engine.torch_engine import TorchEngine
    from serving.gateway.app import ServedModel, StaticCatalog, create_app

    keys = KeyStore()
    secret = keys.create("fuzz-user", roles=("user",))[0]
    engine = TorchEngine(tiny_artifact, device="cpu", model_id="tiny")
    app = create_app(StaticCatalog([ServedModel("tiny", "1", engine)]), max_new_tokens=16, keys=keys)
    yield Target(app, secret, {"model": "tiny"})
    _shutdown_lifespans()
    keys.dispose()
    if engine.ready:
        asyncio.run(engine.stop())


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_control_plane_never_answers_5xx_or_off_spec(control_target: Target, seed: int) -> None:
    print(f"fuzzing the control plane with seed {seed} (reproduce: FORGELINE_FUZZ_SEED={seed})")
    failures = _fuzz(control_target, seed)
    assert not failures, f"{len(failures)} failing request(s), seed {seed}:\n" + "\n".join(failures)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_gateway_never_answers_5xx_or_off_spec(gateway_target: Target, seed: int) -> None:
    print(f"fuzzing the gateway with seed {seed} (reproduce: FORGELINE_FUZZ_SEED={seed})")
    failures = _fuzz(gateway_target, seed)
    assert not failures, f"{len(failures)} failing request(s), seed {seed}:\n" + "\n".join(failures)
