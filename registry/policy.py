"""Promotion policy as data: the recipe's ``promote:`` section or a policy file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = Field(default=None, description="The metric must be at least this.")
    max: float | None = Field(default=None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give `min` or `max` (or both)")
        return self


class PromotionPolicy(BaseModel):
    """Gates a version must pass before an alias moves to it.

    ``thresholds`` are absolute; ``better_than_base`` metrics must beat the base model
    evaluated in the same way; ``no_regression`` metrics may not fall more than
    ``tolerance`` below the version that holds the alias now. Metrics whose name ends
    in ``loss`` are lower-is-better.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str = Field(default="production", description="Alias the pipeline moves when every gate passes.")
    thresholds: dict[str, Threshold] = Field(default_factory=dict, description="Absolute bounds per metric.")
    better_than_base: list[str] = Field(default_factory=list, description="Metrics that must beat the base model.")
    no_regression: list[str] = Field(default_factory=list, description="Metrics that may not regress against the alias holder.")
    tolerance: float = Field(default=0.0, ge=0.0, description="Allowed regression for `no_regression` metrics.")

    @field_validator("to")
    @classmethod
    def _alias_name(cls, value: str) -> str:
        if not value or not value.replace("-", "").replace("_", "").isalnum() or value.isdigit():
            raise ValueError("alias must be letters, digits, '-' or '_' and not a plain number (e.g. `production`)")
        return value
