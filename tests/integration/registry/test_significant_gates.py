"""Per-item scores kept as an MLflow table on the version's run, read back by the gates of a
significance-aware policy through ``check`` and ``promote`` (SQLite registry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from registry.client import Registry
from registry.errors import PolicyRefused
from registry.eval_samples import load_samples, record_samples
from registry.policy import PromotionPolicy
from registry.promotion import check, promote
from tests.support.backends import sqlite_backend, trained_version, unique_name

pytestmark = pytest.mark.integration

POLICY = PromotionPolicy.model_validate(
    {"no_regression": ["accuracy"], "better_than_base": ["accuracy"], "significance": {"alpha": 0.05}}
)


@pytest.fixture
def registry(tmp_path: Path, migrated_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    for key, value in sqlite_backend(tmp_path / "home", migrated_mlflow_db).env.items():
        monkeypatch.setenv(key, value)
    return Registry()


def scored(registry: Registry, name: str, p: float, seed: int, n: int = 200) -> int:
    rng = np.random.default_rng(seed)
    right = (rng.random(n) < p).astype(float).tolist()
    base = (rng.random(n) < 0.3).astype(float).tolist()
    info = trained_version(registry, name, accuracy=float(np.mean(right)))
    record_samples(registry, info, [f"q{i}" for i in range(n)], {"accuracy": right}, {"accuracy": base})
    return info.version


def test_noise_passes_and_a_real_drop_is_refused_with_its_interval(registry: Registry) -> None:
    name = unique_name()
    first = scored(registry, name, 0.85, seed=1)
    samples = load_samples(registry, registry.get_version(name, first))
    assert samples is not None and len(samples.version["accuracy"]) == 200 and len(samples.base["accuracy"]) == 200
    promote(registry, name, first, policy=POLICY, actor="ana")

    # Same quality, different luck: the point estimate may be lower, the gate lets it through.
    noisy = scored(registry, name, 0.85, seed=2)
    result = check(registry, name, noisy, POLICY)
    assert result.passed, result.reason()
    assert "paired over 200 items" in result.gates[-1].detail

    worse = scored(registry, name, 0.65, seed=3)
    with pytest.raises(PolicyRefused) as refused:
        promote(registry, name, worse, policy=POLICY, actor="ana")
    assert "significant regression" in str(refused.value) and "[" in str(refused.value)
    assert registry.aliases(name)["production"] == first
