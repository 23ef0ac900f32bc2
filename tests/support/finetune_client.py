"""Helpers for driving the fine-tuning API with the ``openai`` SDK in tests (not a test module)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import openai

from forgeline.finetune.base_models import BaseModelStore
from registry.keys import KeyStore
from tests.conftest import TINY_BASE

TINY_TRAIN_DEFAULTS = {"learning_rate": 0.002, "max_length": 128, "logging_steps": 5, "save_steps": 10}
"""The operator's defaults for the tiny base in these tests: fast, and a checkpoint every 10 steps."""


def chat_file(path: Path, source: Path, rows: int) -> Path:
    """OpenAI chat rows (``{"messages": [...]}``) from the shipped support-ticket data."""
    rows_in = [json.loads(line) for line in source.read_text().splitlines()[:rows]]
    path.write_text("".join(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n" for r in rows_in))
    return path


@dataclass
class Org:
    """Keys of the people in one test: a trainer and an approver of org acme, a trainer of org globex."""

    secrets: dict[str, str]

    def client(self, url: str, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=self.secrets[who], max_retries=0, timeout=60)


def add_tiny_base(**train: object) -> None:
    """The shipped tiny base as the operator's base model `tiny` (LoRA r16)."""
    BaseModelStore().add("tiny", str(TINY_BASE), actor="ops", adapter={"kind": "lora", "r": 16, "alpha": 32},
                         train={**TINY_TRAIN_DEFAULTS, **train})


def make_org() -> Org:
    """Keys: tess (trainer) and ana (approver) of org acme, otto (trainer) of org globex."""
    keys = KeyStore()
    secrets = {
        "tess": keys.create("tess", roles=("trainer", "user"), org="acme")[0],
        "ana": keys.create("ana", roles=("approver",), org="acme")[0],
        "otto": keys.create("otto", roles=("trainer", "user"), org="globex")[0],
    }
    keys.dispose()
    return Org(secrets)


def all_events(client: openai.OpenAI, job_id: str) -> list[openai.types.fine_tuning.FineTuningJobEvent]:
    """Every event, oldest first, walking the SDK's pages."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=7))))  # auto-paginates
