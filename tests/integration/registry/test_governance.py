"""The promotion workflow on both backends (SQLite; PostgreSQL + a real ``mlflow server``):
history and rollback, two processes racing, crashes mid-promotion, approvals and per-alias
requirements."""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from registry import lineage
from registry.client import Registry
from registry.decisions import decide, lifecycle_state
from registry.errors import ForgelineError, PermissionDeniedError, PolicyRefused
from registry.policy import PromotionPolicy
from registry.promotion import check, promote, rollback
from tests.support.backends import TRAINER, Backend, promote_in_child, trained_version, unique_name

pytestmark = pytest.mark.integration

GATED = PromotionPolicy.model_validate(
    {
        "thresholds": {"accuracy": {"min": 0.8}},
        "no_regression": ["accuracy"],
        "tolerance": 0.05,
        "approvals": {"count": 1},
        "requires": {"production": {"engine": "torch", "approvals": 2}},
    }
)


@pytest.fixture
def registry(backend: Backend) -> Iterator[Registry]:
    reg = Registry()  # from the environment, as the CLI and the control plane build it
    yield reg
    reg.close()


def test_history_and_rollback_after_promote_promote_rollback(backend: Backend, registry: Registry) -> None:
    name = unique_name()
    for accuracy in (0.85, 0.9):
        trained_version(registry, name, accuracy=accuracy)
    policy = PromotionPolicy(thresholds={"accuracy": {"min": 0.8}}, no_regression=["accuracy"])
    promote(registry, name, 1, policy=policy, actor="ana", reason="first release")
    promote(registry, name, 2, policy=policy, actor="bo", reason="better")
    back = rollback(registry, name, actor="oncall", reason="bad answers")

    assert (back.action, back.from_version, back.to_version) == ("rollback", 2, 1)
    assert registry.resolve(name).version == 1
    moves = [(e.action, e.from_version, e.to_version, e.actor) for e in registry.alias_history(name, "production")]
    assert moves == [("promote", None, 1, "ana"), ("promote", 1, 2, "bo"), ("rollback", 2, 1, "oncall")]
    assert registry.audit_drift(name) == {}

    # The CLI reads the same state, from a fresh Registry built from the environment.
    from forgeline.cli import app

    out = CliRunner().invoke(app, ["models", "history", name], terminal_width=200)
    assert out.exit_code == 0, out.output
    rows = [line for line in out.output.splitlines() if "production" in line]
    assert [row.split("│")[5].strip() for row in rows] == ["promote", "promote", "rollback"]


def test_two_processes_promoting_at_once_exactly_one_wins(backend: Backend, registry: Registry) -> None:
    name = unique_name()
    trained_version(registry, name, accuracy=0.9)
    trained_version(registry, name, accuracy=0.91)
    # Forked after the imports (spawn re-imports MLflow: ~30 s on 2 busy cores); each child
    # builds its own Registry, so no client, engine, connection or lock is shared.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=promote_in_child, args=(backend.env, name, v, barrier, results)) for v in (1, 2)]
    for proc in procs:
        proc.start()
    try:
        outcomes = {}
        for _ in procs:
            version, outcome, detail = results.get(timeout=180)
            outcomes[version] = (outcome, detail)
    except queue.Empty:
        pytest.fail("a promoting process did not report back")
    finally:
        for proc in procs:
            proc.join(timeout=60)

    assert sorted(outcome for outcome, _ in outcomes.values()) == ["conflict", "moved"], outcomes
    winner = next(v for v, (outcome, _) in outcomes.items() if outcome == "moved")
    loser_message = next(detail for outcome, detail in outcomes.values() if outcome == "conflict")
    assert f"{name}@production changed meanwhile: expected unset, found version {winner}" in loser_message
    assert registry.resolve(name).version == winner
    assert [(e.from_version, e.to_version, e.actor) for e in registry.alias_history(name)] == [
        (None, winner, f"proc-{winner}")
    ]
    assert registry.audit_drift(name) == {}


@pytest.mark.parametrize("where", ["mlflow_alias_call", "after_audit_insert"])
def test_crash_mid_promotion_leaves_alias_and_audit_consistent(
    backend: Backend, registry: Registry, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    name = unique_name()
    trained_version(registry, name)
    trained_version(registry, name)
    policy = PromotionPolicy()
    promote(registry, name, 1, policy=policy, actor="ana")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("process died here")

    if where == "mlflow_alias_call":
        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash)
    else:
        # The row is inserted and MLflow has moved; the crash hits before the commit.
        real_set_alias = registry._set_alias
        calls: list[tuple[object, ...]] = []

        def set_then_crash(*args: object) -> None:
            real_set_alias(*args)  # type: ignore[arg-type]
            calls.append(args)
            if len(calls) == 1:  # only the move itself; the undo that follows runs normally
                crash()

        monkeypatch.setattr(registry, "_set_alias", set_then_crash)
    with pytest.raises(RuntimeError, match="process died"):
        promote(registry, name, 2, policy=policy, actor="bo")
    monkeypatch.undo()

    assert registry.resolve(name).version == 1
    assert [e.to_version for e in registry.alias_history(name)] == [1]
    assert registry.audit_drift(name) == {}
    # And the next promotion goes through normally.
    promote(registry, name, 2, policy=policy, actor="bo")
    assert [e.to_version for e in registry.alias_history(name)] == [1, 2]


def test_approvals_self_approval_roles_rejection_and_engine_requirement(backend: Backend, registry: Registry) -> None:
    name = unique_name()
    v = trained_version(registry, name, accuracy=0.9)
    assert lifecycle_state(v) == "evaluated"

    with pytest.raises(PermissionDeniedError, match="no self-approval"):
        decide(registry, name, 1, actor=TRAINER, roles=["approver"], decision="approve", comment="lgtm")
    with pytest.raises(PermissionDeniedError, match="needs the approver or admin role"):
        decide(registry, name, 1, actor="tom", roles=["trainer"], decision="approve", comment="lgtm")
    with pytest.raises(ForgelineError, match="needs a comment"):
        decide(registry, name, 1, actor="ana", roles=["approver"], decision="approve", comment=" ")
    assert registry.decisions(name, 1) == []

    # staging needs 1 approval; production needs 2 and a torch engine.
    with pytest.raises(PolicyRefused, match=r"0 of 1 approval"):
        promote(registry, name, 1, policy=GATED, alias="staging", actor=TRAINER)
    decide(registry, name, 1, actor="ana", roles=["approver"], decision="approve", comment="eval looks right")
    promote(registry, name, 1, policy=GATED, alias="staging", actor=TRAINER)

    verdict = check(registry, name, 1, GATED, alias="production")
    failed = {gate.name: gate.detail for gate in verdict.failed}
    assert set(failed) == {"requires:production:engine", "approvals"}
    assert "forgeline build" in failed["requires:production:engine"] and "1 of 2" in failed["approvals"]

    registry.set_tags(name, 1, {lineage.engine_tag("torch"): "file:///engines/1/torch"})
    decide(registry, name, 1, actor="bo", roles=["admin"], decision="reject", comment="answers leak PII")
    verdict = check(registry, name, 1, GATED, alias="production")
    assert [g.name for g in verdict.failed] == ["approvals"] and "rejected by bo" in verdict.failed[0].detail
    with pytest.raises(PolicyRefused, match="rejected by bo"):
        promote(registry, name, 1, policy=GATED, actor="ana")
    decisions = registry.decisions(name, 1)
    assert lifecycle_state(registry.resolve(f"{name}@1"), decisions) == "rejected"

    # bo changes their mind (a new row; nothing is edited): two standing approvals now.
    decide(registry, name, 1, actor="bo", roles=["admin"], decision="approve", comment="PII filter fixed")
    _, entry = promote(registry, name, 1, policy=GATED, actor="ana")
    gates = {g["name"]: g for g in entry.policy_result["gates"]}
    assert gates["approvals"]["passed"] and "(ana, bo)" in gates["approvals"]["detail"]
    assert [d.decision for d in registry.decisions(name, 1)] == ["approve", "reject", "approve"]
    assert registry.resolve(name).version == 1


def test_a_rejection_recorded_after_the_check_still_blocks_the_move(backend: Backend, registry: Registry) -> None:
    name = unique_name()
    trained_version(registry, name)
    decide(registry, name, 1, actor="ana", roles=["approver"], decision="approve", comment="ok")
    policy = PromotionPolicy.model_validate({"approvals": {"count": 1}})
    move = registry.move_alias

    def reject_then_move(*args: object, **kwargs: object) -> object:
        # Another reviewer rejects between promote()'s check and its alias move.
        decide(registry, name, 1, actor="ana", roles=["approver"], decision="reject", comment="wait")
        return move(*args, **kwargs)  # type: ignore[arg-type]

    registry.move_alias = reject_then_move  # type: ignore[method-assign]
    with pytest.raises(PolicyRefused, match="rejected by ana"):
        promote(registry, name, 1, policy=policy, actor=TRAINER)
    assert registry.alias_holder(name, "production") is None
    assert registry.alias_history(name) == []
