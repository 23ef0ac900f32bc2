"""Approval and per-alias gates, standing decisions, lifecycle state, policy files."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from registry import lineage
from registry.approvals import Approval, ApprovalStore, standing
from registry.client import VersionInfo
from registry.decisions import lifecycle_state
from registry.errors import ConfigError
from registry.gates import check_policy
from registry.owner import Owner
from registry.policy import PolicyBook, PromotionPolicy

ACME = Owner("acme", 1)  # the owning org and registration rows are written for

REPO = Path(__file__).resolve().parents[3]


def version(tags: dict[str, str] | None = None, aliases: tuple[str, ...] = ()) -> VersionInfo:
    base = {lineage.TRAINED_BY: "tess", lineage.EVAL_PREFIX + "accuracy": "0.9"}
    return VersionInfo(name="m", version=3, run_id=None, source="s", tags=base | (tags or {}), aliases=aliases, created_ms=0)


def decision(i: int, who: str, what: str = "approve", role: str = "approver", v: int = 3) -> Approval:
    return Approval(i, "m", v, who, role, what, f"comment {i}", datetime.now(UTC))


POLICY = PromotionPolicy.model_validate(
    {"approvals": {"count": 1}, "requires": {"production": {"engine": "torch", "approvals": 2}}}
)


def test_recipe_promote_section_stays_backward_compatible() -> None:
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())["promote"]
    policy = PromotionPolicy.model_validate(raw)
    assert policy.required_approvals("production") == 0 and policy.requires == {}
    names = [g.name for g in check_policy(policy, version(), holder=None).gates]
    assert not any(name.startswith(("approvals", "requires")) for name in names)


def test_approval_counts_per_alias_ignore_trainer_other_roles_and_other_versions() -> None:
    decisions = [
        decision(1, "ana"),
        decision(2, "tess"),  # the trainer (refused at write time; never counted either)
        decision(3, "tom", role="trainer"),  # a role the policy does not count
        decision(4, "bo", v=2),  # another version
    ]
    staging = check_policy(POLICY, version(), holder=None, alias="staging", decisions=decisions)
    assert staging.passed and staging.gates[-1].detail.startswith("1 of 1 approval(s) from admin/approver (ana)")
    production = check_policy(POLICY, version(), holder=None, alias="production", decisions=decisions)
    failed = {g.name: g.detail for g in production.failed}
    assert set(failed) == {"approvals", "requires:production:engine"}
    assert failed["approvals"].startswith("1 of 2") and "forgeline approve m 3" in failed["approvals"]
    assert "forgeline build m@3 --target torch" in failed["requires:production:engine"]

    built = version({lineage.engine_tag("torch"): "s3://engines/m/3"})
    enough = [*decisions, decision(5, "root", role="admin")]  # admin always counts
    assert check_policy(POLICY, built, holder=None, alias="production", decisions=enough).passed


def test_latest_decision_per_person_stands_and_any_rejection_blocks() -> None:
    decisions = [decision(1, "ana"), decision(2, "bo", "reject"), decision(3, "ana", "reject"), decision(4, "bo")]
    assert {who: d.decision for who, d in standing(decisions).items()} == {"ana": "reject", "bo": "approve"}
    no_approvals_needed = PromotionPolicy()
    result = check_policy(no_approvals_needed, version(), holder=None, decisions=decisions)
    assert not result.passed and result.failed[0].detail == "m@3 was rejected by ana (approver): comment 3"


def test_lifecycle_state() -> None:
    assert lifecycle_state(version()) == "evaluated"
    bare = VersionInfo(name="m", version=1, run_id=None, source="s", tags={}, aliases=(), created_ms=0)
    assert lifecycle_state(bare) == "registered"
    assert lifecycle_state(version(), [decision(1, "ana")]) == "approved"
    assert lifecycle_state(version({lineage.engine_tag("torch"): "uri"}), [decision(1, "ana")]) == "built"
    assert lifecycle_state(version(aliases=("production", "staging"))) == "production,staging"
    assert lifecycle_state(version(aliases=("production",)), [decision(1, "bo", "reject")]) == "rejected"


def test_policy_validation_and_policy_book(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="roles must be one or more of approver, admin"):
        PromotionPolicy.model_validate({"approvals": {"roles": ["trainer"]}})
    with pytest.raises(ValueError, match="not a plain number"):
        PromotionPolicy.model_validate({"requires": {"1": {"engine": "torch"}}})
    with pytest.raises(ValueError, match="extra"):
        PromotionPolicy.model_validate({"requires": {"production": {"engin": "torch"}}})

    book_file = tmp_path / "book.yaml"
    book_file.write_text("default: {approvals: {count: 1}}\nmodels:\n  support: {approvals: {count: 2}}\n")
    book = PolicyBook.load(book_file)
    assert book.for_model("support").approvals.count == 2 and book.for_model("other").approvals.count == 1
    book_file.write_text("default: {approvals: {count: -1}}\nmodels: {x: {tolerance: nope}}\n")
    with pytest.raises(ConfigError) as info:
        PolicyBook.load(book_file)
    assert len(info.value.problems) == 2 and {p.path for p in info.value.problems} == {
        "default.approvals.count",
        "models.x.tolerance",
    }
    with pytest.raises(ConfigError, match="not found"):
        PolicyBook.load(tmp_path / "missing.yaml")


def test_approval_store_is_append_only_and_ordered(tmp_path: Path) -> None:
    store = ApprovalStore(f"sqlite:///{tmp_path / 'control.db'}")
    first = store.append(model="m", version=1, approver="ana", role="approver", decision="approve", comment="ok", owner=ACME)
    store.append(model="m", version=2, approver="bo", role="admin", decision="reject", comment="no", owner=ACME)
    store.append(model="m", version=1, approver="ana", role="approver", decision="reject", comment="changed mind", owner=ACME)
    assert [(d.approver, d.decision) for d in store.for_version("m", 1, owner=ACME)] == [("ana", "approve"), ("ana", "reject")]
    assert store.for_version("m", 1, owner=ACME)[0] == first and len(store.for_model("m", owner=ACME)) == 3
    with pytest.raises(ValueError, match="decision"):
        store.append(model="m", version=1, approver="x", role="approver", decision="maybe", comment="", owner=ACME)  # type: ignore[arg-type]
    store.dispose()
