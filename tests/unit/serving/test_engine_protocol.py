"""The Engine protocol declares every capability the gateway asks about; both engines implement it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.engine.base import Engine, EngineStats
from serving.engine.torch_engine import TorchEngine
from serving.engine.upstream import UpstreamEngine
from serving.gateway.catalog import ServedModel, StaticCatalog
from serving.gateway.metrics import GatewayMetrics
from tests.support.engines import StubEngine


def _members() -> set[str]:
    """Engine's declared attributes, properties and methods."""
    declared = set(Engine.__annotations__)
    declared |= {name for name, value in vars(Engine).items() if not name.startswith("_") and callable(value) or isinstance(value, property)}
    return declared


def test_the_protocol_names_what_the_gateway_and_metrics_use() -> None:
    assert {"stats", "step_listener", "serves_adapters", "reports_logprobs", "generate", "ready"} <= _members()


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: TorchEngine(tmp, device="cpu"),
        lambda tmp: UpstreamEngine("http://127.0.0.1:9", "m"),
    ],
    ids=["torch", "upstream"],
)
def test_each_engine_has_every_member(make, tmp_path: Path) -> None:  # noqa: ANN001
    engine = make(tmp_path)
    missing = [name for name in sorted(_members()) if not hasattr(engine, name)]
    assert not missing
    assert isinstance(engine, Engine)


class _CountingEngine(StubEngine):
    """Runs its own decode steps, like the PyTorch engine."""

    def stats(self) -> EngineStats:
        return EngineStats(waiting=3, running=2, loaded_adapters=("a",))


def test_metrics_read_stats_and_listen_to_steps_only_where_the_engine_decodes() -> None:
    local, upstream = _CountingEngine(), UpstreamEngine("http://127.0.0.1:9", "up")
    assert isinstance(local, Engine)
    catalog = StaticCatalog([ServedModel(name="local", version="1", engine=local), ServedModel(name="up", version="2", engine=upstream)])
    metrics = GatewayMetrics()
    metrics.watch(catalog)
    for served in catalog.loaded():
        metrics.attach_engine(served)
    assert upstream.step_listener is None  # its workers decode; no empty batch-size series
    assert local.step_listener is not None
    local.step_listener(4)
    text = metrics.render().decode()
    assert 'forgeline_num_requests_waiting{model="local",version="1"} 3.0' in text
    assert 'forgeline_num_requests_running{model="local",version="1"} 2.0' in text
    assert 'forgeline_loaded_adapters{model="local",version="1"} 1.0' in text
    assert 'forgeline_batch_size_count{model="local",version="1"} 1.0' in text
    assert 'forgeline_num_requests_waiting{model="up"' not in text  # the pool's workers report their own
    assert 'forgeline_batch_size_count{model="up"' not in text
