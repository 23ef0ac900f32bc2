"""``registry.authz``: the one decision both servers take (roles, patterns, orgs, untagged models)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from registry.authz import (
    OPERATOR_ORG,
    Kind,
    Operation,
    Outcome,
    Rule,
    Scope,
    decide,
    enforce,
    owner_org,
    person,
    undeclared,
)
from registry.errors import ModelNotFoundError, PermissionDeniedError
from registry.keys import KeyRecord


def key(*roles: str, org: str = "acme", models: str = "*") -> KeyRecord:
    return KeyRecord(
        id="k", name="ana", prefix="fl-abc", roles=roles, org=org, models=models, rpm=None, tpm=None,
        expires_at=None, revoked_at=None, created_at=datetime.now(UTC),
    )


PROMOTE = Rule(Operation.PROMOTE, Kind.VERSION)


def test_roles_then_pattern_then_org() -> None:
    assert decide(key("user"), PROMOTE, model="m", owner="acme").outcome is Outcome.FORBIDDEN
    assert decide(key("trainer", models="x-*"), PROMOTE, model="m", owner="acme").outcome is Outcome.FORBIDDEN
    assert decide(key("trainer"), PROMOTE, model="m", owner="beta").outcome is Outcome.HIDDEN
    assert decide(key("trainer"), PROMOTE, model="m", owner="acme").allowed
    assert decide(key("admin", org="beta"), PROMOTE, model="m", owner="acme").outcome is Outcome.HIDDEN  # admin of B
    # The role is decided from the key alone: a missing role is 403 whether or not the model is another org's.
    assert decide(key("user", org="beta"), PROMOTE, model="m", owner="acme").outcome is Outcome.FORBIDDEN


def test_untagged_models_are_the_operators_for_governance_and_shared_when_served() -> None:
    assert owner_org(None, Scope.GOVERNANCE) == OPERATOR_ORG and owner_org("", Scope.GOVERNANCE) == OPERATOR_ORG
    assert owner_org(None, Scope.SERVING) is None and owner_org("acme", Scope.SERVING) == "acme"
    infer = Rule(Operation.INFER, Kind.SERVED)
    assert decide(key("user", org="beta"), infer, owner=owner_org(None, Scope.SERVING)).allowed
    assert not decide(key("approver", org="beta"), PROMOTE, owner=owner_org(None, Scope.GOVERNANCE)).allowed


def test_a_looked_up_model_outside_the_pattern_is_hidden() -> None:
    infer = Rule(Operation.INFER, Kind.SERVED)
    tiny_only = key("user", models="tiny*")
    assert decide(tiny_only, infer, model="tiny:quickstart").allowed  # the name alone passes...
    assert decide(tiny_only, infer, looked_up=["quickstart"]).outcome is Outcome.HIDDEN  # ...its weights do not


def test_public_routes_and_auth_off_allow() -> None:
    assert decide(None, PROMOTE, model="m", owner="x").allowed
    assert decide(key("user"), Rule(Operation.PUBLIC, Kind.NONE)).allowed


def test_enforce_raises_403_or_the_missing_error() -> None:
    with pytest.raises(PermissionDeniedError, match="needs one of: trainer, approver"):
        enforce(decide(key("user"), PROMOTE), missing=lambda: ModelNotFoundError("no m"))
    with pytest.raises(ModelNotFoundError, match="no m"):
        enforce(decide(key("trainer"), PROMOTE, owner="beta"), missing=lambda: ModelNotFoundError("no m"))


def test_local_admins_are_the_people_they_name_and_routes_must_be_declared() -> None:
    assert person("local-admin:ana") == "ana" and person("ana") == "ana"
    table = {("GET", "/a"): Rule(Operation.READ, Kind.MODELS)}
    assert undeclared([("GET", "/a"), ("POST", "/b")], table) == [("POST", "/b")]
