"""Registry against a real MLflow store (SQLite in tmp_path): versions, resolution,
promotion, rollback, and the all-or-nothing alias move."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import event

from registry import lineage
from registry.aliases import NO_HOLDER
from registry.client import Registry, VersionInfo
from registry.errors import ConflictError, ModelNotFoundError, NotFoundError, PolicyRefused
from registry.policy import PromotionPolicy, Threshold
from registry.promotion import promote, rollback
from registry.runs import download_artifact_uri
from tests.support import backends

pytestmark = pytest.mark.integration

POLICY = PromotionPolicy(
    thresholds={"accuracy": Threshold(min=0.8)},
    better_than_base=["eval_loss"],
    no_regression=["accuracy"],
    tolerance=0.01,
)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_mlflow_db: Path) -> Iterator[Registry]:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(migrated_mlflow_db, home / "mlflow.db")
    monkeypatch.setenv("FORGELINE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("FORGELINE_DB_URL", raising=False)
    reg = Registry()  # everything from settings, as the CLI does
    yield reg
    reg.close()


def trained_version(registry: Registry, name: str = "tiny", **evaluation: float) -> VersionInfo:
    """A registered, evaluated version of ``name`` (tests/support/backends.py)."""
    return backends.trained_version(registry, name, **evaluation)


def test_create_version_carries_lineage_and_artifacts_live_under_home(registry: Registry, tmp_path: Path) -> None:
    v = trained_version(registry)
    assert (v.name, v.version) == ("tiny", 1)
    assert v.tags[lineage.BASE_MODEL] == "tiny-base" and v.tags[lineage.METHOD] == "sft"
    assert v.metrics() == {"accuracy": 0.9, "eval_loss": 1.0} and v.base_metrics() == {"eval_loss": 2.0}
    assert v.run_id and v.created_ms > 0
    experiment = registry.client.get_experiment(registry.ensure_experiment("forgeline-tests"))
    assert experiment.artifact_location.startswith((tmp_path / "home" / "artifacts").as_uri())
    artifacts = registry.client.list_artifacts(v.run_id, "model")
    assert [a.path for a in artifacts] == ["model/config.json"]

    trained_version(registry)
    assert [x.version for x in registry.list_versions("tiny")] == [1, 2]
    assert registry.list_models() == ["tiny"]


def test_resolve_by_name_alias_and_number(registry: Registry) -> None:
    v1 = trained_version(registry)
    v2 = trained_version(registry)
    registry.move_alias("tiny", "production", 1, actor="ana", reason="first")
    registry.move_alias("tiny", "staging", 2, actor="ana", reason="try")

    assert registry.resolve("tiny").version == v1.version
    assert registry.resolve("tiny@production").aliases == ("production",)
    assert registry.resolve("tiny@staging").version == v2.version
    assert registry.resolve("tiny@1").version == 1
    assert registry.resolve("tiny@latest").version == 2
    assert registry.alias_holder("tiny", "canary") is None


def test_unknown_refs_say_what_exists(registry: Registry) -> None:
    trained_version(registry)
    with pytest.raises(ModelNotFoundError, match=r"'tiny'.*no alias 'production'.*promote a version first"):
        registry.resolve("tiny")
    registry.move_alias("tiny", "staging", 1, actor="ana", reason="")
    with pytest.raises(ModelNotFoundError, match=r"no alias 'canary' \(aliases: staging→1\)"):
        registry.resolve("tiny@canary")
    with pytest.raises(ModelNotFoundError, match=r"'tiny@7'.*no version 7 \(versions: 1\)"):
        registry.resolve("tiny@7")
    # An unknown model's message names only what was asked: never the other models (tenancy).
    with pytest.raises(ModelNotFoundError, match=r"'nope@production'.*no registered model named 'nope'") as unknown:
        registry.resolve("nope@production")
    assert "tiny" not in str(unknown.value)
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.get_version("tiny", 9)


def test_promote_moves_alias_and_audits(registry: Registry) -> None:
    trained_version(registry, accuracy=0.85)
    trained_version(registry, accuracy=0.9)

    result, entry = promote(registry, "tiny", 1, policy=POLICY, actor="ana", reason="first release")
    assert result.passed
    assert (entry.actor, entry.from_version, entry.to_version, entry.reason) == ("ana", None, 1, "first release")
    assert entry.action == "promote" and entry.policy_result == result.to_dict()

    _, second = promote(registry, "tiny", 2, policy=POLICY, actor="bo")
    assert (second.from_version, second.to_version) == (1, 2)
    assert second.reason.startswith("all 3 gate(s) passed")
    assert registry.resolve("tiny").version == 2
    assert registry.alias_history("tiny", "production") == [entry, second]
    assert registry.audit_drift("tiny") == {}


def test_refused_promotion_moves_nothing(registry: Registry) -> None:
    trained_version(registry, accuracy=0.9)
    trained_version(registry, accuracy=0.85)  # regresses by more than the tolerance
    promote(registry, "tiny", 1, policy=POLICY, actor="ana")

    with pytest.raises(PolicyRefused, match=r"no_regression:accuracy") as refused:
        promote(registry, "tiny", 2, policy=POLICY, actor="bo")
    assert refused.value.policy_result is not None and refused.value.policy_result["passed"] is False
    assert registry.resolve("tiny").version == 1
    assert len(registry.alias_history("tiny")) == 1


def test_rollback_returns_to_previous_holder_and_history_is_ordered(registry: Registry) -> None:
    for _ in range(3):
        trained_version(registry)
    for version in (1, 2, 3):
        registry.move_alias("tiny", "production", version, actor="ana", reason=f"v{version}")

    entry = rollback(registry, "tiny", actor="oncall", reason="bad outputs")
    assert (entry.action, entry.from_version, entry.to_version) == ("rollback", 3, 2)
    rollback(registry, "tiny", actor="oncall", reason="still bad")  # walks further back, not to 3
    assert registry.resolve("tiny").version == 1

    history = registry.alias_history("tiny", "production")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("promote", None, 1),
        ("promote", 1, 2),
        ("promote", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
    ]
    with pytest.raises(NotFoundError, match="no earlier version"):
        rollback(registry, "tiny", actor="oncall")
    assert rollback(registry, "tiny", to_version=3, actor="oncall").to_version == 3


def test_crash_inside_mlflow_leaves_alias_and_audit_in_agreement(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained_version(registry)
    trained_version(registry)
    promote(registry, "tiny", 1, policy=POLICY, actor="ana")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("MLflow server went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash)
    with pytest.raises(RuntimeError, match="went away"):
        promote(registry, "tiny", 2, policy=POLICY, actor="bo")
    monkeypatch.undo()

    assert registry.resolve("tiny").version == 1
    assert [e.to_version for e in registry.alias_history("tiny")] == [1]
    assert registry.audit_drift("tiny") == {}


def test_failed_audit_commit_moves_the_alias_back(registry: Registry) -> None:
    trained_version(registry)
    trained_version(registry)
    promote(registry, "tiny", 1, policy=POLICY, actor="ana")

    def fail_commit(conn: object) -> None:
        raise RuntimeError("disk full")

    event.listen(registry.audit.engine, "commit", fail_commit)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            promote(registry, "tiny", 2, policy=POLICY, actor="bo")
    finally:
        event.remove(registry.audit.engine, "commit", fail_commit)

    assert registry.resolve("tiny").version == 1
    assert registry.audit_drift("tiny") == {}


def test_compare_and_set_and_concurrent_promotions(registry: Registry) -> None:
    for _ in range(3):
        trained_version(registry)
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def first_promotion(version: int) -> None:
        barrier.wait()
        try:
            registry.move_alias("tiny", "production", version, actor=f"t{version}", reason="", expected_from=NO_HOLDER)
            outcomes[version] = "moved"
        except ConflictError:
            outcomes[version] = "conflict"

    threads = [threading.Thread(target=first_promotion, args=(v,)) for v in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes.values()) == ["conflict", "moved"]
    winner = next(v for v, outcome in outcomes.items() if outcome == "moved")
    assert registry.resolve("tiny").version == winner
    assert [e.to_version for e in registry.alias_history("tiny")] == [winner]

    with pytest.raises(ConflictError, match="changed meanwhile"):
        registry.move_alias("tiny", "production", 3, actor="c", reason="", expected_from=99)
    assert registry.resolve("tiny").version == winner


def test_delete_alias_is_audited_and_outside_moves_show_as_drift(registry: Registry) -> None:
    trained_version(registry)
    trained_version(registry)
    registry.move_alias("tiny", "staging", 1, actor="ana", reason="")
    entry = registry.delete_alias("tiny", "staging", actor="ana", reason="retired")
    assert (entry.action, entry.from_version, entry.to_version) == ("delete", 1, None)
    assert registry.alias_holder("tiny", "staging") is None
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        registry.delete_alias("tiny", "staging", actor="ana", reason="")

    registry.client.set_registered_model_alias("tiny", "production", "2")  # behind forgeline's back
    assert registry.audit_drift("tiny") == {"production": (2, None)}
    with pytest.raises(ConflictError, match="outside forgeline"):
        rollback(registry, "tiny", actor="oncall")

    # reconcile writes MLflow's truth down; afterwards rollback works from the log again.
    (fixed,) = registry.reconcile("tiny", actor="oncall")
    assert (fixed.action, fixed.alias, fixed.from_version, fixed.to_version) == ("reconcile", "production", None, 2)
    assert registry.audit_drift("tiny") == {} and registry.reconcile("tiny", actor="oncall") == []
    promote(registry, "tiny", 1, policy=PromotionPolicy(), actor="ana")
    assert rollback(registry, "tiny", actor="oncall").to_version == 2


# -- runs, metrics and artifacts (registry.runs) ----------------------------------------


def _run(registry: Registry, tags: dict[str, str] | None = None) -> str:
    experiment_id = registry.ensure_experiment("forgeline-runs")
    return registry.client.create_run(experiment_id, tags=tags or {}).info.run_id


def test_metrics_round_trip_in_step_order(registry: Registry) -> None:
    run_id = _run(registry)
    for step in (3, 1, 2):
        registry.log_metrics(run_id, {"loss": 1.0 / step, "lr": 0.1}, step=step)
    assert registry.metric_points(run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert registry.metric_points(run_id, "never_logged") == []
    assert set(registry.metric_history(run_id)) == {"loss", "lr"}
    run = registry.get_run(run_id)
    assert run.run_id == run_id and run.metrics["loss"] == pytest.approx(1.0 / 3)


def test_find_run_by_tag_and_end_it(registry: Registry) -> None:
    run_id = _run(registry, {"forgeline.test_tag": "job-1"})
    _run(registry, {"forgeline.test_tag": "job-2"})
    found = registry.find_run("forgeline-runs", tag="forgeline.test_tag", value="job-1")
    assert found is not None and found.run_id == run_id
    assert registry.find_run("forgeline-runs", tag="forgeline.test_tag", value="job-3") is None
    assert registry.find_run("no-such-experiment", tag="forgeline.test_tag", value="job-1") is None
    registry.end_run(run_id, status="KILLED")
    assert registry.get_run(run_id).status == "KILLED"


def test_artifacts_upload_download_and_tables(registry: Registry, tmp_path: Path) -> None:
    run_id = _run(registry)
    src = tmp_path / "engine"
    src.mkdir()
    (src / "manifest.json").write_text('{"ok": true}')
    uri = registry.upload_artifacts(run_id, src, "engine/torch")
    assert uri.endswith("/engine/torch")
    local = download_artifact_uri(uri, tmp_path / "copy", tracking_uri=registry.tracking_uri)
    assert (local / "manifest.json").read_text() == '{"ok": true}'
    registry.log_table(run_id, {"item": ["a", "b"], "score": [1.0, 0.0]}, "tables/t.json")
    path = registry.download_run_artifact(run_id, "tables/t.json", tmp_path / "t")
    assert '"item"' in path.read_text()


def test_a_missing_run_is_a_forgeline_not_found(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no MLflow run"):
        registry.get_run("0" * 32)
    with pytest.raises(NotFoundError, match="no MLflow run"):
        registry.metric_history("0" * 32)
