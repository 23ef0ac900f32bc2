"""Wire models of the fine-tuning jobs API, in OpenAI's shapes.

Requests are validated here (unknown fields are errors that name the field), responses
are rendered from stored rows. ``"auto"`` hyper-parameters are resolved when the job is
created and stored resolved, so a job reports the numbers it trains with.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .jobs import EventRow, JobRow

Auto = Literal["auto"]
_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Wire):
    """Shared by every method; ``auto`` picks a value from the data and the base model."""

    n_epochs: int | Auto = Field(default="auto", description="Passes over the training file (1–50).")
    batch_size: int | Auto = Field(default="auto", description="Examples per optimiser step (1–256).")
    learning_rate_multiplier: float | Auto = Field(
        default="auto", description="Scales the base model's default learning rate (0 < m <= 10)."
    )

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 50:
            raise ValueError(f"n_epochs must be between 1 and 50 or 'auto', not {value}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError(f"batch_size must be between 1 and 256 or 'auto', not {value}")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and not 0 < value <= 10:
            raise ValueError(f"learning_rate_multiplier must be in (0, 10] or 'auto', not {value}")
        return value


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto = Field(default="auto", description="How far the policy may move from the base (0 < beta <= 2).")

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and not 0 < value <= 2:
            raise ValueError(f"beta must be in (0, 2] or 'auto', not {value}")
        return value


class ReinforcementHyperparameters(Hyperparameters):
    compute_multiplier: float | Auto = Field(default="auto", description="Scales completions sampled per prompt (8 at 1.0).")
    eval_interval: int | Auto = Field(default="auto", description="Optimiser steps between evaluations.")
    eval_samples: int | Auto = Field(default="auto", description="Validation prompts scored per evaluation.")
    reasoning_effort: Literal["default", "low", "medium", "high"] = Field(
        default="default", description="Longest completion sampled: low 256, medium/default 512, high 1024 tokens."
    )


class SupervisedMethod(_Wire):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(_Wire):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class ReinforcementMethod(_Wire):
    grader: dict[str, Any] = Field(description="How completions are scored (see forgeline.finetune.graders).")
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)


class Method(_Wire):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _matching_section(self) -> Method:
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.type is {self.type!r} but method.{other} is set; fix: remove method.{other}")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.type 'reinforcement' needs method.reinforcement.grader")
        return self

    def hyperparameters(self) -> Hyperparameters:
        section = getattr(self, self.type)
        if section is None:
            return DpoHyperparameters() if self.type == "dpo" else Hyperparameters()
        return section.hyperparameters


class MlflowIntegration(_Wire):
    experiment: str = Field(min_length=1, max_length=256, description="MLflow experiment the job's run goes into.")


class Integration(_Wire):
    """Only ``mlflow`` is offered: every job is tracked in forgeline's MLflow anyway; this picks the experiment."""

    type: Literal["mlflow"]
    mlflow: MlflowIntegration


class CreateJobRequest(_Wire):
    """``POST /v1/fine_tuning/jobs`` (the body the ``openai`` SDK sends)."""

    model: str = Field(min_length=1, description="A base model the operator added with `forgeline models add-base`.")
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method.supervised.hyperparameters; supervised only."
    )
    suffix: str | None = Field(default=None, description="Up to 40 characters: lower-case letters, digits and dashes.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    integrations: list[Integration] | None = None
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 key/value pairs, returned as given.")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX.match(value):
            raise ValueError(
                f"suffix {value!r} is not allowed: use 1-40 lower-case letters, digits and dashes, e.g. 'legal-v2'"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> CreateJobRequest:
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyper-parameters in method.<type>.hyperparameters only, not also at the top level")
        return self

    def resolved_method(self) -> Method:
        if self.method is not None:
            return self.method
        return Method(type="supervised", supervised=SupervisedMethod(hyperparameters=self.hyperparameters or Hyperparameters()))


def _unix(when: Any) -> int | None:
    return int(when.timestamp()) if when is not None else None


def job_object(job: JobRow) -> dict[str, Any]:
    """A job in OpenAI's ``fine_tuning.job`` shape (plus forgeline's registered name and version)."""
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _unix(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": _unix(job.finished_at),
        "hyperparameters": job.hyperparameters,
        "method": job.method,
        "model": job.model,
        "organization_id": job.org,
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "integrations": job.integrations or None,
        "metadata": job.metadata,
        "estimated_finish": None,
        "user_provided_suffix": job.suffix,
        "forgeline": {"registered_model": job.registered_name, "version": job.version, "run_id": job.run_id,
                      "attempt": job.attempt, "launcher_job_id": job.launcher_job_id},
    }


def event_object(event: EventRow) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": _unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
