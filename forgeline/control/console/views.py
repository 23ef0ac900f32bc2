"""What each console page shows, gathered from the registry as plain data (no HTML here).

Each page reads a model's versions, decisions and aliases once and evaluates the gates with the
pure ``check_policy``, so a model with many versions costs a handful of queries, not one per gate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime

from forgeline.control.auth import owns_version
from registry import lineage
from registry.approvals import Approval, standing
from registry.audit import AuditEntry
from registry.authz import Kind, Operation, Rule, Scope, Verdict, decide, enforce, owner_org, person
from registry.client import Registry, VersionInfo, missing_model_message
from registry.decisions import lifecycle_state
from registry.errors import ForgelineError, ModelNotFoundError
from registry.gates import PolicyResult, check_policy
from registry.keys import KeyRecord
from registry.owner import Owner
from registry.policy import PolicyBook, PromotionPolicy


def allowed(key: KeyRecord, operation: Operation, kind: Kind, model: str | None = None) -> bool:
    """Whether the key's roles and model pattern allow ``operation`` (``registry.authz``, as the API)."""
    return decide(key, Rule(operation, kind), model=model).allowed


def require(key: KeyRecord, operation: Operation, kind: Kind, model: str | None = None) -> None:
    """Raise the API's 403 for a key whose role or pattern does not allow ``operation``."""
    enforce(decide(key, Rule(operation, kind), model=model), missing=lambda: ModelNotFoundError(
        missing_model_message(str(model)), param="model"))


def _read_verdict(key: KeyRecord, name: str, versions: list[VersionInfo]) -> Verdict:
    owner = next((v.tags[lineage.ORG] for v in versions if v.tags.get(lineage.ORG)), None)
    return decide(key, Rule(Operation.READ, Kind.MODEL), model=name, owner=owner_org(owner, Scope.GOVERNANCE))


def may_see(key: KeyRecord, name: str, versions: list[VersionInfo]) -> bool:
    """Whether ``key`` may see model ``name``: the control plane's own rule (role, pattern, and
    the model's organisation; untagged models are the operator's ``default`` org's)."""
    return _read_verdict(key, name, versions).allowed


def can_decide(key: KeyRecord, policy: PromotionPolicy, version: VersionInfo) -> bool:
    """Whether ``key`` may approve or reject ``version``: the decide role, and never the
    version's own trainer (``registry.decisions.decide`` refuses that too)."""
    trainer = person(version.tags.get(lineage.TRAINED_BY, ""))
    return allowed(key, Operation.DECIDE, Kind.VERSION, version.name) and trainer != key.name


def counts_for(key: KeyRecord, policy: PromotionPolicy) -> bool:
    """Whether the key's approval counts toward ``policy`` (its roles, or admin)."""
    return any(key.has_role(r) for r in (*policy.approvals.roles, "admin"))


def can_promote(key: KeyRecord, name: str) -> bool:
    return allowed(key, Operation.PROMOTE, Kind.VERSION, name)


def can_roll_back(key: KeyRecord, name: str) -> bool:
    return allowed(key, Operation.ROLLBACK, Kind.MODEL, name)


@dataclass
class ModelState:
    """One model as a page needs it: versions, decisions, aliases and its policy."""

    name: str
    versions: list[VersionInfo]
    decisions: list[Approval]
    aliases: dict[str, int]
    policy: PromotionPolicy
    owner: Owner
    """The owner and registration (``Registry.governance_owner``): decisions and history shown are its rows only."""

    def version(self, number: int) -> VersionInfo:
        for info in self.versions:
            if info.version == number:
                return info
        raise ModelNotFoundError(f"{self.name} has no version {number}", param="version")

    def decisions_on(self, number: int) -> list[Approval]:
        return [d for d in self.decisions if d.version == number]

    def holder(self, alias: str) -> VersionInfo | None:
        number = self.aliases.get(alias)
        return next((v for v in self.versions if v.version == number), None)

    def state(self, info: VersionInfo) -> str:
        return lifecycle_state(info, self.decisions_on(info.version))

    def gates(self, info: VersionInfo, alias: str | None = None) -> PolicyResult:
        alias = alias or self.policy.to
        return check_policy(
            self.policy, info, holder=self.holder(alias), alias=alias, decisions=self.decisions_on(info.version)
        )

    def target_aliases(self) -> list[str]:
        """The aliases a version of this model can be promoted to: the policy's target, the ones
        it has requirements for, and the ones already set."""
        return list(dict.fromkeys([self.policy.to, *self.policy.requires, *sorted(self.aliases)]))


def load_model(registry: Registry, policies: PolicyBook, key: KeyRecord, name: str) -> ModelState:
    """A model the key may see; another org's model answers as not found, like a missing one."""
    versions, owner = registry.versions_and_owner(name)
    # 403 for a missing role or a pattern miss; another org's model is 404, like a missing one.
    enforce(_read_verdict(key, name, versions), missing=lambda: ModelNotFoundError(missing_model_message(name), param="model"))
    return ModelState(
        name=name,
        # A version another org trained under a shared name is not there for this key.
        versions=[v for v in versions if owns_version(key, v.tags.get(lineage.ORG))],
        decisions=registry.decisions(name, owner=owner),
        aliases=registry.aliases(name),
        policy=policies.for_model(name),
        owner=owner,
    )


def visible_models(registry: Registry, policies: PolicyBook, key: KeyRecord) -> list[ModelState]:
    """Every model the key may see."""
    states = []
    for name in registry.list_models():
        if not key.allows_model(name):
            continue
        try:
            states.append(load_model(registry, policies, key, name))
        except ForgelineError:  # another org's (404) or outside the key's reach (403)
            continue
    return states


@dataclass
class InboxItem:
    model: str
    version: VersionInfo
    alias: str
    gates: PolicyResult
    why: str


def inbox(models: list[ModelState], key: KeyRecord) -> list[InboxItem]:
    """Versions awaiting this key's decision: not rejected, not yet decided by this key, not
    trained by it, and short of the approvals their policy's target alias needs."""
    items = []
    for state in models:
        for info in state.versions:
            if not (can_decide(key, state.policy, info) and counts_for(key, state.policy)):
                continue
            if state.aliases.get(state.policy.to) == info.version:
                continue
            latest = standing(state.decisions_on(info.version))
            if key.name in latest or any(d.decision == "reject" for d in latest.values()):
                continue
            result = state.gates(info)
            approvals = next((g for g in result.gates if g.name == "approvals"), None)
            if approvals is None or approvals.passed:
                continue
            failing = [g.name for g in result.gates if not g.passed and g.name != "approvals"]
            why = approvals.detail.split(";")[0]
            why += f"; also failing: {', '.join(failing)}" if failing else "; every other gate passes"
            items.append(InboxItem(state.name, info, state.policy.to, result, why))
    return sorted(items, key=lambda item: -item.version.created_ms)


@dataclass
class MetricRow:
    metric: str
    version: float | None
    base: float | None
    production: float | None


def metric_rows(info: VersionInfo, production: VersionInfo | None) -> list[MetricRow]:
    """The version's evaluation beside its base's and the production holder's, per metric."""
    mine, base = info.metrics(), info.base_metrics()
    prod = production.metrics() if production is not None else {}
    names = sorted(set(mine) | set(base) | set(prod))
    return [MetricRow(m, mine.get(m), base.get(m), prod.get(m)) for m in names]


def eval_report(info: VersionInfo) -> dict[str, str] | None:
    """Where the version's comparison report is on its run, and which suites it was scored on."""
    folder = info.tags.get(lineage.EVAL_REPORT)
    if not folder:
        return None
    return {"path": f"{folder}/comparison.md", "plot": f"{folder}/comparison.png", "suites": info.tags.get(lineage.EVAL_SUITES, "")}


@dataclass
class LineageStep:
    label: str
    value: str
    link: str | None = None


def mlflow_ui_url(registry: Registry) -> str | None:
    """Where people open the MLflow UI: ``FORGELINE_MLFLOW_UI_URL``, else an HTTP tracking server."""
    configured = os.environ.get("FORGELINE_MLFLOW_UI_URL")
    if configured:
        return configured.rstrip("/")
    uri = registry.tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def lineage_chain(registry: Registry, state: ModelState, info: VersionInfo) -> list[LineageStep]:
    """Dataset → training run → version → engine artifacts → the aliases serving it now."""
    tags = info.tags
    ui = mlflow_ui_url(registry)
    steps = [LineageStep("base model", tags.get(lineage.BASE_MODEL, "—"))]
    for label, tag in (("training data", lineage.DATA_TRAIN), ("evaluation data", lineage.DATA_EVAL)):
        if tag in tags:
            steps.append(LineageStep(label, tags[tag]))
    steps.append(LineageStep("dataset digest", tags.get(lineage.DATASET_DIGEST, "—")))
    run_id = info.run_id or tags.get(lineage.RUN_ID)
    steps.append(
        LineageStep("training run", run_id or "—", f"{ui}/#/experiments/0/runs/{run_id}" if ui and run_id else None)
    )
    method = " · ".join(filter(None, [tags.get(lineage.METHOD), tags.get(lineage.ADAPTER)]))
    steps.append(LineageStep("method", method or "—"))
    steps.append(LineageStep("trained by", tags.get(lineage.TRAINED_BY, "—")))
    steps.append(LineageStep("recipe hash · git commit", f"{tags.get(lineage.RECIPE_HASH, '—')} · {tags.get(lineage.GIT_COMMIT, '—')}"))
    steps.append(LineageStep("version", info.ref))
    engines = {k[len(lineage.ENGINE_PREFIX) :]: v for k, v in tags.items() if k.startswith(lineage.ENGINE_PREFIX)}
    for target, uri in sorted(engines.items()):
        steps.append(LineageStep(f"engine ({target})", uri))
    if not engines:
        steps.append(LineageStep("engine", "not built yet"))
    serving = [f"{state.name}@{alias}" for alias, number in sorted(state.aliases.items()) if number == info.version]
    steps.append(LineageStep("served as", ", ".join(serving) or "no alias"))
    return steps


def training_curves(registry: Registry, info: VersionInfo) -> dict[str, list[tuple[float, float]]]:
    """Loss-like metric histories of the version's training run (empty when there is none)."""
    run_id = info.run_id or info.tags.get(lineage.RUN_ID)
    if not run_id:
        return {}
    try:
        history = registry.metric_history(run_id)
    except ForgelineError:
        return {}
    return {
        name: [(float(step), value) for step, value in points if math.isfinite(value)]
        for name, points in sorted(history.items())
        if "loss" in name and points
    }


@dataclass
class AuditQuery:
    model: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    problems: list[str] = field(default_factory=list)


def search_audit(registry: Registry, models: list[ModelState], query: AuditQuery) -> list[AuditEntry]:
    """Alias moves of the visible models, newest first, filtered by model, actor and date."""
    found: list[AuditEntry] = []
    for model in models:
        if query.model not in (None, "", model.name):
            continue
        for entry in registry.alias_history(model.name, owner=model.owner):
            when = entry.created_at
            if query.actor and query.actor.lower() not in entry.actor.lower():
                continue
            if query.since and when.replace(tzinfo=None) < query.since.replace(tzinfo=None):
                continue
            if query.until and when.replace(tzinfo=None) > query.until.replace(tzinfo=None):
                continue
            found.append(entry)
    return sorted(found, key=lambda e: e.id, reverse=True)
