"""Lineage: the tag keys a forgeline model version carries, and where their values come from.

Every key starts with ``forgeline.`` so our tags never collide with MLflow's own
(``mlflow.*``) or a user's. Evaluation results live in tags rather than run metrics
because they belong to the *version* (a version can be re-evaluated long after its
training run ended, and the base model's score on the same eval sits next to it).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping

logger = logging.getLogger(__name__)

PREFIX = "forgeline."

BASE_MODEL = "forgeline.base_model"
"""Hub id or path of the model the version was trained from."""
METHOD = "forgeline.method"
"""Training method: ``sft`` | ``dpo`` | ``grpo``."""
ADAPTER = "forgeline.adapter"
"""Adapter kind: ``lora`` | ``qlora`` | ``none`` (a full fine-tune: the artifact holds every weight)."""
LORA_KINDS = ("lora", "qlora")
"""`ADAPTER` values whose artifact is a PEFT adapter over the base."""
FULL_WEIGHTS = "none"
"""`ADAPTER` value of a full fine-tune."""
RECIPE_HASH = "forgeline.recipe_hash"
"""Digest of the validated recipe that produced the version."""
DATASET_DIGEST = "forgeline.dataset_digest"
"""Digest(s) of the training data."""
GIT_COMMIT = "forgeline.git_commit"
"""Commit of the code that trained the version (see :func:`git_commit`)."""
RUN_ID = "forgeline.run_id"
"""MLflow run that trained the version."""
TRAINED_BY = "forgeline.trained_by"
"""Who started the training run."""
DATA_TRAIN = "forgeline.data.train"
"""Where the training data came from (file path or hub dataset name)."""
DATA_EVAL = "forgeline.data.eval"
"""Held-out data the version is evaluated on (``forgeline evaluate`` defaults to it)."""
ORG = "forgeline.org"
"""Organisation that owns the version (fine-tuning jobs); the gateway serves it to that org's keys only."""
FINE_TUNING_JOB = "forgeline.fine_tuning_job"
"""The fine-tuning job that trained the version."""
TRAINED_TOKENS = "forgeline.trained_tokens"
"""Run tag: tokens of the training examples times the epochs (``training.tokens``), as OpenAI counts them."""
ENGINE_PREFIX = "forgeline.engine."
"""``forgeline.engine.<target>`` = artifact URI of the engine built for that target."""
EVAL_SAMPLES = "forgeline.eval_samples"
"""Run artifact (an MLflow table) with the per-item scores behind the ``forgeline.eval.*`` tags."""
EVAL_SUITES = "forgeline.eval_suites"
"""Comma-separated names of the evaluation suites the version was scored on (``forgeline/suites/<name>.json`` tables)."""
EVAL_REPORT = "forgeline.eval_report"
"""Run artifact folder of the comparison report (table and plot against base and production)."""
EVAL_PREFIX = "forgeline.eval."
"""``forgeline.eval.<metric>`` = the version's score on the evaluation."""
BASE_EVAL_PREFIX = "forgeline.base_eval."
"""``forgeline.base_eval.<metric>`` = the base model's score on the same evaluation."""

# Tags on the training run (MLflow run tags, not version tags).
RUN_NAME = "forgeline.name"
"""The job's name (the recipe's ``name``)."""
TOTAL_STEPS = "forgeline.total_steps"
"""Optimizer steps the trainer plans (the fine-tuning supervisor reports progress against it)."""
BEST_CHECKPOINT = "forgeline.best_checkpoint"
"""Folder name of the checkpoint the trainer judged best."""
RESUMED_FROM_STEP = "forgeline.resumed_from_step"
"""The step a resumed run continued from."""
BASE_MODEL_NAME = "forgeline.base_model_name"
"""The fine-tuning API's name for the base model (``BASE_MODEL`` holds its hub id or path)."""


def is_full_fine_tune(tags: Mapping[str, str]) -> bool:
    """Whether a version's artifact is a whole model (``adapter: {kind: none}``), not a PEFT adapter."""
    return tags.get(ADAPTER) == FULL_WEIGHTS


def engine_tag(target: str) -> str:
    """Tag key holding the artifact URI of the engine built for ``target`` (e.g. ``torch``)."""
    return ENGINE_PREFIX + target


def git_commit(path: str | os.PathLike[str] = ".") -> str | None:
    """The ``HEAD`` commit of the git checkout containing ``path``.

    Args:
        path: any folder inside the checkout.

    Returns:
        The full commit hash, or ``None`` when ``path`` is not in a git repository, the
        repository has no commit yet, or ``git`` is not installed (lineage is best effort:
        training must not fail because it runs from an unpacked wheel).
    """
    try:
        proc = subprocess.run(
            ["git", "-C", os.fspath(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("git rev-parse failed in %s: %s", path, exc)
        return None
    if proc.returncode != 0:
        logger.debug("not a git checkout with commits: %s (%s)", path, proc.stderr.strip())
        return None
    return proc.stdout.strip() or None
