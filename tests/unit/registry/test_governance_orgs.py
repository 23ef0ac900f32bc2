"""Approvals and audit rows belong to the org that owned the model and to that registration
of it: a name deleted in MLflow and registered again, by another organisation or the same
one, inherits neither (real SQLite MLflow registry and control database; the control API
answers through ``TestClient``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert
from typer.testing import CliRunner

from forgeline.cli import app as cli_app
from forgeline.control import create_control_app
from registry import legacy_orgs, lineage
from registry.approvals import approvals
from registry.audit import AuditLog, alias_events
from registry.client import Registry
from registry.db import now
from registry.decisions import decide
from registry.errors import NotFoundError, PolicyRefused
from registry.keys import KeyStore
from registry.policy import PolicyBook
from registry.promotion import check, promote, rollback
from tests.conftest import point_home

POLICIES = PolicyBook.model_validate({"default": {"approvals": {"count": 1}}})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("orgs")


@pytest.fixture(scope="module")
def registry(root: Path) -> Iterator[Registry]:
    with pytest.MonkeyPatch.context() as mp:
        point_home(mp, root / "home")
        found = Registry(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", audit=AuditLog(f"sqlite:///{root / 'control.db'}"))
        try:
            yield found
        finally:
            found.close()


def _register(registry: Registry, root: Path, name: str, org: str | None, trainer: str = "tom") -> int:
    source = root / "weights"
    source.mkdir(exist_ok=True)
    tags = {lineage.TRAINED_BY: trainer, **({lineage.ORG: org} if org else {})}
    return registry.create_version(name, source=str(source), run_id=None, tags=tags).version


def _approve_and_promote(registry: Registry, name: str, version: int) -> None:
    decide(registry, name, version, actor="ana", roles=["approver"], decision="approve", comment="looks good")
    promote(registry, name, version, policy=POLICIES.for_model(name), alias="production", actor="tom")


@pytest.mark.parametrize(
    ("old_owner", "new_owner"),
    [("acme", "beta"), ("acme", None), ("acme", "acme"), (None, None)],
    ids=["another-org", "operator-untagged", "same-org", "operator-both-times"],
)
def test_a_name_registered_again_inherits_no_approvals_or_history(
    registry: Registry, root: Path, old_owner: str | None, new_owner: str | None
) -> None:
    name = f"shared-{old_owner or 'operator'}-{new_owner or 'operator'}"
    first = old_owner or "default"
    for _ in range(2):
        _approve_and_promote(registry, name, _register(registry, root, name, old_owner))
    before = registry.governance_owner(name)
    assert before.org == first
    assert [(d.version, d.org) for d in registry.decisions(name)] == [(1, first), (2, first)]
    assert [(e.to_version, e.org) for e in registry.alias_history(name)] == [(1, first), (2, first)]
    assert {e.model_created_ms for e in registry.alias_history(name)} == {before.model_created_ms}

    registry.client.delete_registered_model(name)  # an operator deletes it in MLflow directly
    for _ in range(2):
        _register(registry, root, name, new_owner, trainer="tim")
    owner = new_owner or "default"
    after = registry.governance_owner(name)
    assert after.org == owner and after.model_created_ms != before.model_created_ms

    # the old model's standing approvals of versions 1 and 2 do not count for the new model's versions 1 and 2
    assert registry.decisions(name) == [] and registry.decisions(name, 1) == []
    verdict = check(registry, name, 1, POLICIES.for_model(name), alias="production")
    assert not verdict.passed and "approval" in verdict.reason()
    with pytest.raises(PolicyRefused):
        promote(registry, name, 1, policy=POLICIES.for_model(name), alias="production", actor="tim")
    # nor does its trail: empty history, and rollback finds nothing of the old model's to return to
    assert registry.alias_history(name) == []
    registry.move_alias(name, "production", 2, actor="tim", reason="first of the new owner")
    assert [(e.to_version, e.org) for e in registry.alias_history(name)] == [(2, owner)]
    assert registry.audit_drift(name) == {}
    with pytest.raises(NotFoundError, match="no earlier version"):
        rollback(registry, name, alias="production", actor="tim")
    # the old model's rows are kept (append-only), only never shown for the new one
    assert len(registry.approvals.for_model(name, owner=before)) == 2 and len(registry.audit.history(name, owner=before)) == 2

    # the new owner's decision is recorded for it and counts
    recorded = decide(registry, name, 1, actor="bea", roles=["approver"], decision="approve", comment="ok")
    assert (recorded.org, recorded.model_created_ms) == (owner, after.model_created_ms)
    assert [d.approver for d in registry.decisions(name, 1)] == ["bea"]
    assert check(registry, name, 1, POLICIES.for_model(name), alias="production").passed


def test_the_control_api_shows_the_new_owner_none_of_the_old_owners_rows(registry: Registry, root: Path) -> None:
    name = "shared-api"
    _approve_and_promote(registry, name, _register(registry, root, name, "acme"))
    registry.client.delete_registered_model(name)
    _register(registry, root, name, "beta", trainer="tim")

    keys = KeyStore(registry.audit.url)
    try:
        secret, _ = keys.create("bea", roles=("approver",), org="beta")
        acme_secret, _ = keys.create("ana", roles=("approver",), org="acme")
        app = create_control_app(registry=registry, keys=keys, policies=POLICIES, supervise=False)
        with TestClient(app) as control:
            beta = {"Authorization": f"Bearer {secret}"}
            assert control.get(f"/v1/models/{name}/versions/1/approvals", headers=beta).json()["approvals"] == []
            assert control.get(f"/v1/models/{name}/versions/1", headers=beta).json()["decisions"] == []
            history = control.get(f"/v1/models/{name}/history", headers=beta).json()
            assert history["entries"] == [] and history["aliases"] == {}
            gates = control.get(f"/v1/models/{name}/versions/1/gates", headers=beta).json()
            assert gates["passed"] is False
            # and acme no longer sees the name at all (beta owns it now)
            acme = {"Authorization": f"Bearer {acme_secret}"}
            assert control.get(f"/v1/models/{name}/history", headers=acme).status_code == 404
    finally:
        keys.dispose()


def _legacy_rows(registry: Registry, name: str, *, age: timedelta, org: str | None = None) -> None:
    """Rows as written before 0004_governance_org (no org), or between 0004 and 0006 (an org, no registration)."""
    when, comment = now() - age, "between" if org else "legacy"
    with registry.audit.engine.begin() as conn:
        conn.execute(insert(approvals).values(model=name, version=1, approver="ana", role="approver", decision="approve",
                                              comment=comment, created_at=when, org=org))
        conn.execute(insert(alias_events).values(model=name, alias="production", from_version=None, to_version=1,
                                                 actor="ana", reason=comment, action="promote", created_at=when, org=org))


def test_legacy_rows_count_for_nobody_until_claimed_for_the_model_registered_before_them(
    registry: Registry, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "legacy"
    _register(registry, root, name, "acme")
    _legacy_rows(registry, name, age=timedelta(days=30))  # before this model's registration: a deleted namesake's
    _legacy_rows(registry, name, age=timedelta(0))  # after it: this model's
    _legacy_rows(registry, name, age=timedelta(days=30), org="acme")  # an org but no registration: a namesake's
    _legacy_rows(registry, name, age=timedelta(0), org="acme")  # an org, no registration, after it: this model's
    _legacy_rows(registry, "gone", age=timedelta(0))  # a model no longer in MLflow
    assert registry.decisions(name) == [] and registry.alias_history(name) == []  # NULL counts for nobody
    assert legacy_orgs.unclaimed(registry.audit.engine) == 10

    runner = CliRunner()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    status = runner.invoke(cli_app, ["db", "status", "--db-url", registry.audit.url])
    assert status.exit_code == 0 and "10 approval and audit rows" in " ".join(status.output.split())
    upgraded = runner.invoke(cli_app, ["db", "upgrade", "--db-url", registry.audit.url])
    said = " ".join(upgraded.output.split())  # rich wraps long lines
    assert upgraded.exit_code == 0 and "gave 4 approval and audit rows" in said and "6 stay with nobody" in said, said

    owner = registry.governance_owner(name)
    assert [(d.comment, d.org, d.model_created_ms) for d in registry.decisions(name)] == [
        ("legacy", "acme", owner.model_created_ms), ("between", "acme", owner.model_created_ms)
    ]
    entries = registry.alias_history(name)
    assert [e.reason for e in entries] == ["legacy", "between"]
    assert all(e.org == "acme" and e.created_at > registry.governance_owner(name).registered_at for e in entries)
    again = legacy_orgs.claim(registry)  # idempotent: the old and orphaned rows stay with nobody
    assert again.total == 0 and again.left == 6
