"""Generate the synthetic support-ticket routing dataset (train/eval JSONL).

Each row maps a customer message to one of five queue names. Messages are built from
per-category keyword sentences mixed with shared filler, so held-out rows are unseen
combinations: a model has to pick up the keywords, not memorise whole messages.

The vocabulary lists here are also the "domain language" that ``make_tiny_base.py``
pretrains on (without ever showing the routing instruction or its labels).

Run from the repository root::

    python assets/make_support_tickets.py
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger("make_support_tickets")

SEED = 20240611
N_TRAIN = 1200
N_EVAL = 150
INSTRUCTION = "Route this ticket: "
OUT_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data" / "support-tickets"

CATEGORIES: tuple[str, ...] = ("billing", "shipping", "account", "technical", "refund")

# Category-specific sentences. Slots: {product}, {n}, {day}. Keywords are kept disjoint
# between categories so the label is recoverable from the message alone.
ISSUE_SENTENCES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice on my credit card this month.",
        "My invoice shows the wrong amount.",
        "Why did my monthly fee go up by {n} dollars?",
        "My card was declined when I tried to pay.",
        "Can you send me a copy of the invoice for {day}?",
        "I want to change the payment method on file.",
        "There is an extra charge on my statement I do not recognise.",
        "The tax on my bill looks too high.",
        "I need to update the card you charge every month.",
        "My bank shows a pending charge of {n} dollars from you.",
        "Please explain the late payment fee on my statement.",
        "I paid the invoice but it still says unpaid.",
    ],
    "shipping": [
        "My package has not arrived yet.",
        "The tracking number you sent does not work.",
        "The courier left my parcel at the wrong door.",
        "My {product} was supposed to be delivered on {day}.",
        "The delivery is {n} days late.",
        "Can I change the delivery address for my order?",
        "The box arrived crushed and the {product} inside is dented.",
        "Tracking says delivered but there is no parcel here.",
        "When will my shipment leave the warehouse?",
        "The driver never showed up on {day}.",
        "Can you ship the {product} by express delivery instead?",
        "Only half of my package arrived.",
    ],
    "account": [
        "I forgot my password and cannot sign in.",
        "My login is locked after too many attempts.",
        "How do I change the email address on my profile?",
        "I never got the two factor code by text.",
        "Someone else may have used my username.",
        "Please delete my profile and all my data.",
        "The password reset link has expired.",
        "I want to merge my two profiles into one.",
        "How do I change my username?",
        "I cannot verify my phone number on my profile.",
        "My security question answer is not accepted.",
        "I was logged out and now my sign in fails.",
    ],
    "technical": [
        "The app crashes every time I open it.",
        "I get an error code {n} on the settings page.",
        "The website is stuck on the loading screen.",
        "The screen freezes when I press the save button.",
        "My {product} will not sync with the app.",
        "The latest update broke the search feature.",
        "The installation fails at {n} percent.",
        "The page shows a blank white screen in my browser.",
        "Notifications stopped working after the update.",
        "The app is very slow and drains my battery.",
        "My {product} keeps disconnecting from the wifi.",
        "The upload button does nothing when I click it.",
    ],
    "refund": [
        "I would like a refund for my {product}.",
        "I returned the {product} on {day} and want my money back.",
        "How long does a refund take to reach my bank?",
        "I cancelled the order and still have no refund.",
        "Can I get my money back for the unused months?",
        "The {product} is not what I expected, please refund me.",
        "You promised a refund {n} days ago.",
        "I want to return this item for a full refund.",
        "Please reimburse me for the broken {product}.",
        "Can you refund the order instead of sending a replacement?",
        "I sent the return label back, where is my money?",
        "Is a partial refund possible for the {product}?",
    ],
}

# Shared, label-neutral text: appears with every category so it carries no signal.
GREETINGS: list[str] = [
    "Hi,",
    "Hello,",
    "Hey there,",
    "Good morning,",
    "Good evening,",
    "Dear support,",
    "Hi team,",
    "",
]
FILLERS: list[str] = [
    "I have been a customer for {n} years.",
    "Thanks in advance for your help.",
    "Please get back to me soon.",
    "This is the second time I am writing.",
    "I am quite frustrated.",
    "I bought a {product} from you recently.",
    "Hope you are having a good day.",
    "I tried again on {day} with no luck.",
    "My order number is {n}.",
    "Let me know if you need more details.",
    "I really like your products otherwise.",
    "This is urgent for me.",
    "I could not find an answer in the help pages.",
    "My friend had the same issue.",
]
SIGNOFFS: list[str] = ["Thanks, {name}", "Regards, {name}", "Cheers, {name}", "Best, {name}", "", ""]
PRODUCTS: list[str] = [
    "blender", "laptop", "phone case", "coffee maker", "headset", "smart watch", "desk lamp",
    "router", "camera", "speaker", "keyboard", "jacket", "backpack", "kettle", "tablet",
]  # fmt: skip
DAYS: list[str] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES: list[str] = [
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon",
    "Kim", "Luis", "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
]  # fmt: skip


def fill(template: str, rng: random.Random) -> str:
    """Fill the {product}/{n}/{day}/{name} slots of one template."""
    return template.format(
        product=rng.choice(PRODUCTS),
        n=rng.randint(2, 99),
        day=rng.choice(DAYS),
        name=rng.choice(NAMES),
    )


def make_message(category: str, rng: random.Random) -> str:
    """One customer message: greeting, 1-2 issue sentences and 0-2 fillers (shuffled), sign-off."""
    issues = rng.sample(ISSUE_SENTENCES[category], k=rng.choice((1, 1, 2)))
    fillers = rng.sample(FILLERS, k=rng.choice((0, 1, 1, 2)))
    body = [fill(s, rng) for s in issues + fillers]
    rng.shuffle(body)
    parts = [rng.choice(GREETINGS), *body, fill(rng.choice(SIGNOFFS), rng)]
    return " ".join(p for p in parts if p)


def make_row(message: str, category: str) -> dict[str, list[dict[str, str]]]:
    """TRL conversational prompt-completion row."""
    return {
        "prompt": [{"role": "user", "content": INSTRUCTION + message}],
        "completion": [{"role": "assistant", "content": category}],
    }


def generate(n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Class-balanced, de-duplicated train/eval splits; no message appears in both."""
    rng = random.Random(seed)
    per_train, per_eval = n_train // len(CATEGORIES), n_eval // len(CATEGORIES)
    seen: set[str] = set()  # global, so a message can never land in both splits
    train: list[tuple[str, str]] = []
    eval_: list[tuple[str, str]] = []
    for category in CATEGORIES:
        messages: list[str] = []
        while len(messages) < per_train + per_eval:
            message = make_message(category, rng)
            if message not in seen:
                seen.add(message)
                messages.append(message)
        eval_ += [(m, category) for m in messages[:per_eval]]
        train += [(m, category) for m in messages[per_eval:]]
    rng.shuffle(train)
    rng.shuffle(eval_)
    return [make_row(m, c) for m, c in train], [make_row(m, c) for m, c in eval_]


def eval_messages() -> set[str]:
    """Messages of the eval split, so the pretraining corpus can leave them out."""
    _, eval_rows = generate()
    return {r["prompt"][0]["content"].removeprefix(INSTRUCTION) for r in eval_rows}


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    train, eval_ = generate()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, OUT_DIR / "train.jsonl")
    write_jsonl(eval_, OUT_DIR / "eval.jsonl")
    (OUT_DIR / "README.md").write_text(
        "# support-tickets\n\n"
        f"Synthetic support-ticket routing: a customer message (prompt `{INSTRUCTION.strip()} <message>`) maps to one "
        f"queue name ({', '.join(CATEGORIES)}). TRL conversational prompt-completion format; "
        f"{len(train)} train / {len(eval_)} eval rows, no message in both.\n"
        "Regenerate (deterministic) with `python assets/make_support_tickets.py`.\n",
        encoding="utf-8",
    )
    log.info("wrote %d train and %d eval rows to %s", len(train), len(eval_), OUT_DIR)


if __name__ == "__main__":
    main()
