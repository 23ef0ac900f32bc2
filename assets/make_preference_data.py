"""Generate preference pairs for support-ticket routing (DPO train/eval JSONL).

Each row is a customer message with the queue it belongs to (``chosen``) and another
queue (``rejected``): TRL's conversational preference format. Messages come from the
support-ticket generator with a seed of their own, so they differ from the SFT data.

Run from the repository root::

    python assets/make_preference_data.py
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_support_tickets import CATEGORIES, INSTRUCTION, generate, write_jsonl  # noqa: E402

log = logging.getLogger("make_preference_data")

SEED = 20240917
N_TRAIN = 600
N_EVAL = 100
OUT_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data" / "support-preferences"


def to_pair(row: dict, rng: random.Random) -> dict:
    """A prompt-completion routing row as a preference pair with a wrong queue rejected."""
    label = row["completion"][0]["content"]
    wrong = rng.choice([c for c in CATEGORIES if c != label])
    return {
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": label}],
        "rejected": [{"role": "assistant", "content": wrong}],
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rng = random.Random(SEED)
    train_rows, eval_rows = generate(n_train=N_TRAIN, n_eval=N_EVAL, seed=SEED)
    train = [to_pair(r, rng) for r in train_rows]
    eval_ = [to_pair(r, rng) for r in eval_rows]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, OUT_DIR / "train.jsonl")
    write_jsonl(eval_, OUT_DIR / "eval.jsonl")
    (OUT_DIR / "README.md").write_text(
        "# support-preferences\n\n"
        f"Preference pairs for support-ticket routing: the prompt is `{INSTRUCTION.strip()} <message>`, `chosen` is "
        f"the right queue ({', '.join(CATEGORIES)}), `rejected` another one. TRL conversational preference format; "
        f"{len(train)} train / {len(eval_)} eval rows.\n"
        "Regenerate (deterministic) with `python assets/make_preference_data.py`.\n",
        encoding="utf-8",
    )
    log.info("wrote %d train and %d eval pairs to %s", len(train), len(eval_), OUT_DIR)


if __name__ == "__main__":
    main()
