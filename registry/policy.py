"""Promotion policy as data: the recipe's ``promote:`` section or a policy file.

A policy file holds one policy (the same keys as a recipe's ``promote:`` section); the
control plane reads a :class:`PolicyBook` (``default:`` plus per-model ``models:``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.errors import ConfigError, FieldProblem
from registry.refs import check_alias

APPROVER_ROLES: tuple[str, ...] = ("approver", "admin")
"""Roles that may approve or reject a version (``admin`` always counts towards a policy)."""


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = Field(default=None, description="The metric must be at least this.")
    max: float | None = Field(default=None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give `min` or `max` (or both)")
        return self


class ApprovalRule(BaseModel):
    """How many people must approve a version before it may be promoted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(default=0, ge=0, description="Approvals needed from distinct people other than the trainer.")
    roles: list[str] = Field(
        default_factory=lambda: ["approver"],
        description="Roles whose approvals count (`admin` always counts).",
    )

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = [role for role in value if role not in APPROVER_ROLES]
        if unknown or not value:
            raise ValueError(f"roles must be one or more of {', '.join(APPROVER_ROLES)} (got {unknown or value})")
        return value


class TargetRequirement(BaseModel):
    """What a version needs before one particular alias may point at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str | None = Field(
        default=None,
        description="Engine target that must have been built (`forgeline build --target`), e.g. `torch`.",
    )
    approvals: int | None = Field(
        default=None, ge=0, description="Approvals needed for this alias; overrides `approvals.count`."
    )


class Significance(BaseModel):
    """Compare per-item scores with confidence intervals instead of point estimates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        default=0.05, gt=0.0, lt=0.5,
        description="One-sided error level: the chance of refusing a version that did not really regress.",
    )
    resamples: int = Field(default=2000, ge=200, le=100_000, description="Bootstrap resamples per comparison.")
    seed: int = Field(default=0, description="Resampling seed, so a verdict is reproducible.")


class PromotionPolicy(BaseModel):
    """Gates a version must pass before an alias moves to it.

    ``thresholds`` are absolute; ``better_than_base`` metrics must beat the base model
    evaluated in the same way; ``no_regression`` metrics may not fall more than
    ``tolerance`` below the version that holds the alias now. With ``significance``, both
    compare per-item scores: ``no_regression`` refuses only a drop that is significant at
    ``alpha`` and ``better_than_base`` needs a significant gain (``registry.significance``).
    Metrics whose name ends
    in ``loss`` are lower-is-better. ``approvals`` counts standing approvals (a standing
    rejection blocks); ``requires`` adds per-alias requirements, e.g.
    ``{production: {engine: torch, approvals: 2}}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str = Field(default="production", description="Alias the pipeline moves when every gate passes.")
    thresholds: dict[str, Threshold] = Field(default_factory=dict, description="Absolute bounds per metric.")
    better_than_base: list[str] = Field(default_factory=list, description="Metrics that must beat the base model.")
    no_regression: list[str] = Field(default_factory=list, description="Metrics that may not regress against the alias holder.")
    tolerance: float = Field(default=0.0, ge=0.0, description="Allowed regression for `no_regression` metrics.")
    significance: Significance | None = Field(
        default=None,
        description="Decide `no_regression` and `better_than_base` on confidence intervals over per-item scores "
        "(falls back to point estimates for versions evaluated without them).",
    )
    approvals: ApprovalRule = Field(default_factory=ApprovalRule, description="Human approvals required.")
    requires: dict[str, TargetRequirement] = Field(
        default_factory=dict, description="Per-alias requirements, e.g. `production: {engine: torch}`."
    )

    @field_validator("to")
    @classmethod
    def _alias_name(cls, value: str) -> str:
        return check_alias(value)

    @field_validator("requires")
    @classmethod
    def _alias_keys(cls, value: dict[str, TargetRequirement]) -> dict[str, TargetRequirement]:
        for alias in value:
            check_alias(alias)
        return value

    def required_approvals(self, alias: str) -> int:
        """Approvals needed before ``alias`` may point at a version."""
        override = self.requires.get(alias, TargetRequirement()).approvals
        return self.approvals.count if override is None else override


class PolicyBook(BaseModel):
    """Policies per model, for the control plane: ``default`` plus ``models.<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: PromotionPolicy = Field(default_factory=PromotionPolicy, description="Policy for models not listed.")
    models: dict[str, PromotionPolicy] = Field(default_factory=dict, description="Policy per registered model name.")

    def for_model(self, name: str) -> PromotionPolicy:
        """The policy that governs model ``name``."""
        return self.models.get(name, self.default)

    @classmethod
    def load(cls, path: str | Path) -> PolicyBook:
        """Read a policy book from YAML.

        Raises:
            ConfigError: the file is missing, not YAML, or has invalid fields (all listed).
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                problems=[FieldProblem("<file>", "policy file not found", str(path), "pass an existing YAML file")],
                source=str(path),
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            problem = FieldProblem("<file>", f"not valid YAML: {exc}".replace("\n", " "), None, "fix the YAML syntax")
            raise ConfigError(problems=[problem], source=str(path)) from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = [
                FieldProblem(".".join(str(p) for p in err["loc"]) or "<root>", err["msg"], None, None)
                for err in exc.errors()
            ]
            raise ConfigError(problems=problems, source=str(path)) from None
