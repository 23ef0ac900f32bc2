"""An OpenAI fine-tuning request → a forgeline ``TrainJob``.

``supervised`` / ``dpo`` / ``reinforcement`` become the SFT / DPO / GRPO methods; the
uploaded files are converted to the rows our trainers read and written beside the job;
``auto`` hyper-parameters are resolved from the data and the operator's defaults for the
base model (``forgeline models add-base --set train.learning_rate=...``).

The rules for ``auto``:

- ``n_epochs``: enough passes to show the model about 1,000 examples, between 1 and 10
  (1 for reinforcement, where each prompt is sampled many times).
- ``batch_size``: the base model's ``train.batch_size`` default (8 when unset), at most the rows.
- ``learning_rate_multiplier``: 1.0, applied to the base model's ``train.learning_rate``
  (TrainSpec's 2e-4 when unset, suited to LoRA).
- ``beta`` (dpo): 0.1. ``compute_multiplier`` (reinforcement): 1.0, i.e. 8 completions per prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from registry import lineage
from registry.errors import ErrorCode, ForgelineError
from registry.settings import private_dir
from training.checkpoints import write_atomic
from training.config import (
    AdapterSpec,
    DataSpec,
    DistributedSpec,
    DPOMethod,
    GRPOMethod,
    MethodSpec,
    SFTMethod,
    TrainSpec,
)
from training.job import TrainJob
from training.preflight import check_training

from .base_models import BaseModelRecord
from .formats import FileSummary, training_rows
from .graders import rewards_for
from .protocol import CreateJobRequest, DpoHyperparameters, Method, ReinforcementHyperparameters

JOB_TAG = lineage.FINE_TUNING_JOB
"""MLflow run tag naming the fine-tuning job, so the control plane finds its run."""

_EFFORT_TOKENS = {"low": 256, "default": 512, "medium": 512, "high": 1024}


@dataclass(frozen=True)
class Inputs:
    """The files a job trains on, as stored (path on disk + what upload validation found)."""

    train_path: Path
    train_summary: FileSummary
    validation_path: Path | None = None
    validation_summary: FileSummary | None = None


def _invalid(message: str, param: str) -> ForgelineError:
    return ForgelineError(message, code=ErrorCode.INVALID_REQUEST, param=param)


def registered_name(org: str, base: str, suffix: str | None, job_id: str) -> str:
    """The registered model a job's result becomes a version of: ``ft-<org>-<base>-<suffix>``.

    Jobs with the same suffix on the same base add versions to one model, so promotion
    policies compare them (``no_regression``); without a suffix each job gets its own.
    """
    tail = suffix or job_id.removeprefix("ftjob-")[:8]
    clean_org = "".join(c if c.isalnum() or c in "-_." else "-" for c in org.lower()).strip("-") or "org"
    return f"ft-{clean_org}-{base}-{tail}"


def _resolve_hyperparameters(method: Method, base: BaseModelRecord, rows: int) -> dict[str, Any]:
    given = method.hyperparameters()
    default_batch = int(base.train.get("batch_size", TrainSpec().batch_size))
    if given.n_epochs != "auto":
        epochs = int(given.n_epochs)
    elif method.type == "reinforcement":
        epochs = 1
    else:
        epochs = min(10, max(1, math.ceil(1000 / rows)))
    resolved: dict[str, Any] = {
        "n_epochs": epochs,
        "batch_size": int(given.batch_size) if given.batch_size != "auto" else max(1, min(default_batch, rows)),
        "learning_rate_multiplier": float(given.learning_rate_multiplier) if given.learning_rate_multiplier != "auto" else 1.0,
    }
    if isinstance(given, DpoHyperparameters):
        resolved["beta"] = float(given.beta) if given.beta != "auto" else 0.1
    if isinstance(given, ReinforcementHyperparameters):
        resolved["compute_multiplier"] = float(given.compute_multiplier) if given.compute_multiplier != "auto" else 1.0
        resolved["eval_interval"] = given.eval_interval
        resolved["eval_samples"] = given.eval_samples
        resolved["reasoning_effort"] = given.reasoning_effort
    return resolved


def _method_spec(method: Method, hp: dict[str, Any], inputs: Inputs) -> MethodSpec:
    if method.type == "supervised":
        return SFTMethod()
    if method.type == "dpo":
        return DPOMethod(beta=hp["beta"])
    assert method.reinforcement is not None  # Method's validator demands it for this type
    rewards = rewards_for(method.reinforcement.grader, inputs.train_summary.reference_fields)
    return GRPOMethod(
        rewards=rewards,
        num_generations=max(2, round(8 * hp["compute_multiplier"])),
        max_completion_length=_EFFORT_TOKENS[hp["reasoning_effort"]],
    )


def _train_spec(base: BaseModelRecord, hp: dict[str, Any], seed: int) -> TrainSpec:
    defaults = dict(base.train)
    learning_rate = float(defaults.pop("learning_rate", TrainSpec().learning_rate)) * hp["learning_rate_multiplier"]
    values = {**defaults, "epochs": hp["n_epochs"], "batch_size": hp["batch_size"], "learning_rate": learning_rate,
              "seed": seed, "resume": "auto", "max_steps": -1}
    if isinstance(hp.get("eval_interval"), int):
        values["eval_steps"] = hp["eval_interval"]
    if isinstance(hp.get("eval_samples"), int):
        values["eval_samples"] = hp["eval_samples"]
    try:
        return TrainSpec.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "hyperparameters"
        raise _invalid(f"these hyper-parameters do not fit base model {base.name!r}: {field}: {first['msg']}; "
                       "fix: change the hyper-parameter or the base model's defaults", "hyperparameters") from None


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_train_job(
    request: CreateJobRequest,
    *,
    job_id: str,
    org: str,
    actor: str,
    seed: int,
    base: BaseModelRecord,
    inputs: Inputs,
    job_root: Path,
    distributed: DistributedSpec,
    experiment: str,
    local: bool = True,
) -> tuple[TrainJob, dict[str, Any]]:
    """The training job for ``request`` and its resolved hyper-parameters.

    Writes the converted rows to ``job_root/data`` (the folder every training node sees).
    ``local``: the job trains on this machine, so its hardware is checked too (QLoRA needs CUDA).

    Raises:
        ForgelineError: a file does not fit the method, a grader is not offered, or the
            hyper-parameters do not fit the base model (``invalid_request``, naming the field).
    """
    method = request.resolved_method()
    train_rows = training_rows(inputs.train_path, method.type)
    hp = _resolve_hyperparameters(method, base, len(train_rows))
    data_dir = job_root / "data"
    private_dir(data_dir)
    _write_rows(data_dir / "train.jsonl", train_rows)
    data = DataSpec(train=str(data_dir / "train.jsonl"))
    if inputs.validation_path is not None:
        try:
            eval_rows = training_rows(inputs.validation_path, method.type)
        except ForgelineError as err:
            raise _invalid(f"validation_file: {err}", "validation_file") from None
        _write_rows(data_dir / "eval.jsonl", eval_rows)
        data = DataSpec(train=data.train, eval=str(data_dir / "eval.jsonl"))
    elif len(train_rows) < 10:
        raise _invalid(f"training_file has {len(train_rows)} rows and there is no validation_file; fix: give at "
                       "least 10 rows (a tenth is held out for evaluation) or upload a validation_file", "training_file")
    try:
        adapter = AdapterSpec.model_validate(base.adapter or {})
    except ValidationError as err:  # checked at add-base; a changed schema may still reject an old row
        raise _invalid(f"base model {base.name!r} has invalid adapter defaults: {err}", "model") from None
    digest = hashlib.sha256(
        json.dumps([job_id, base.source, request.model_dump(mode="json"), seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    job = TrainJob(
        name=registered_name(org, base.name, request.suffix, job_id),
        model=base.model_spec(),
        data=data,
        method=_method_spec(method, hp, inputs),
        adapter=adapter,
        train=_train_spec(base, hp, seed),
        distributed=distributed,
        recipe_hash=digest,
        experiment=experiment,
        actor=actor,
        output_dir=str(job_root / "output"),
        run_tags={JOB_TAG: job_id, lineage.ORG: org, lineage.BASE_MODEL_NAME: base.name},
    )
    # The checks training runs first, now: a bad combination is a 400 here, not a failed job later.
    problems = check_training(job.method, job.adapter, job.train, job.distributed, local=local)
    if problems:
        raise _invalid("these settings cannot train (recipe terms): " + "; ".join(str(p) for p in problems)
                       + "; fix: change the hyper-parameters (batch_size, compute_multiplier) or the base model's "
                       "defaults", "hyperparameters")
    return job, hp
