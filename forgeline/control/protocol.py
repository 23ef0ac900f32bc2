"""Wire models of the control-plane API (request bodies and responses)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.approvals import Approval
from registry.audit import AuditEntry
from registry.client import VersionInfo
from registry.gates import PolicyResult
from registry.refs import AliasName, VersionNumber


class DecisionRequest(BaseModel):
    """``POST /v1/models/{name}/versions/{version}/approvals``."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"] = Field(default="approve", description="Approve or reject the version.")
    comment: str = Field(min_length=1, description="Why; kept with the decision.")


class PromoteRequest(BaseModel):
    """``POST /v1/models/{name}/versions/{version}/promote``."""

    model_config = ConfigDict(extra="forbid")

    alias: AliasName | None = Field(default=None, description="Alias to move; default: the policy's `to`.")
    reason: str = Field(default="", description="Why (kept in the audit log).")


class RollbackRequest(BaseModel):
    """``POST /v1/models/{name}/aliases/{alias}/rollback``."""

    model_config = ConfigDict(extra="forbid")

    to_version: VersionNumber | None = Field(default=None, description="Version to return to; default: the previous holder.")
    reason: str = Field(default="", description="Why (kept in the audit log).")


class GateOut(BaseModel):
    name: str
    passed: bool
    detail: str


class PolicyResultOut(BaseModel):
    passed: bool
    reason: str
    gates: list[GateOut]

    @classmethod
    def of(cls, result: PolicyResult) -> PolicyResultOut:
        return cls(
            passed=result.passed,
            reason=result.reason(),
            gates=[GateOut(name=g.name, passed=g.passed, detail=g.detail) for g in result.gates],
        )


class AuditEntryOut(BaseModel):
    id: int
    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    action: str
    policy_result: dict[str, Any] | None
    created_at: str

    @classmethod
    def of(cls, entry: AuditEntry) -> AuditEntryOut:
        return cls.model_validate(entry.to_dict())


class ApprovalOut(BaseModel):
    id: int
    model: str
    version: int
    approver: str
    role: str
    decision: str
    comment: str
    created_at: str

    @classmethod
    def of(cls, approval: Approval) -> ApprovalOut:
        return cls.model_validate(approval.to_dict())


class VersionOut(BaseModel):
    name: str
    version: int
    state: str = Field(description="Lifecycle state: registered, evaluated, approved, built, rejected, or its aliases.")
    aliases: list[str]
    run_id: str | None
    source: str
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def of(cls, info: VersionInfo, state: str) -> VersionOut:
        return cls(
            name=info.name,
            version=info.version,
            state=state,
            aliases=list(info.aliases),
            run_id=info.run_id,
            source=info.source,
            metrics=info.metrics(),
            base_metrics=info.base_metrics(),
            tags=info.tags,
        )


class VersionDetailOut(VersionOut):
    decisions: list[ApprovalOut]


class PromotionOut(BaseModel):
    policy_result: PolicyResultOut
    audit: AuditEntryOut


class ModelList(BaseModel):
    models: list[str]


class VersionList(BaseModel):
    versions: list[VersionOut]


class ApprovalList(BaseModel):
    approvals: list[ApprovalOut]


class HistoryOut(BaseModel):
    model: str
    entries: list[AuditEntryOut]
    aliases: dict[str, int] = Field(description="Where each alias points now, per MLflow.")
