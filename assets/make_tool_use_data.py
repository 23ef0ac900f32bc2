"""Generate a small tool-use dataset in OpenAI's chat fine-tuning format (train/eval JSONL).

A support assistant has four tools, whose arguments a model gets in two ways:

- copied from the question: the order number of ``lookup_order(order_id)``,
  ``start_refund(order_id, reason)`` and ``escalate(order_id, priority)``;
- implied by it: the ``reason`` (``broken``, ``late``, ``damaged``, a word of the question), the
  ``priority`` (``low``, ``normal``, ``high``, from wording such as "urgent" or "no rush") and
  the ``team`` of ``transfer(team)`` (``billing``, ``shipping``, ``returns``, from what the
  customer asks; nothing to copy).

Order numbers are three digits written ``#482``, in the question and in the arguments alike:
the tiny base's tokenizer splits both into the same ``#``-and-digit tokens, so copying one is
plain induction over four tokens (a bare ``482`` starts with a space-digit token the JSON never
has). Even so the 0.9M-parameter tiny base does not learn to copy them within CI time
(recipes/tiny/sft-tools.yaml says what was tried); the ``transfer`` calls are the exact calls
it does learn. The schemas are strict-ready: enums for the categorical arguments and a
pattern for the order number.

Each conversation: the customer asks, the assistant calls the right tool, the tool answers, and
the assistant tells the customer. Some rows carry an earlier small-talk turn with ``weight: 0``
(context, not trained), so the data exercises every part of the format: ``tools``,
``tool_calls``, ``tool`` results, several assistant turns and per-message weights.

``preferences-{train,eval}.jsonl`` are DPO pairs from the same conversations: at the tool
call, the right call chosen and a call of another tool rejected (``recipes/tiny/dpo-tools.yaml``).

Run from the repository root::

    python assets/make_tool_use_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261201
N_TRAIN, N_EVAL = 400, 40
OUT_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tool-use"

ORDER_ID = {"type": "string", "pattern": "^#[0-9]{3}$"}
REASONS = ["broken", "late", "damaged"]
PRIORITIES = ["low", "normal", "high"]
TEAMS = ["billing", "shipping", "returns"]


def _tool(name: str, description: str, properties: dict[str, object]) -> dict[str, object]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}}}


TOOLS = [
    _tool("lookup_order", "Where an order is.", {"order_id": ORDER_ID}),
    _tool("start_refund", "Start a refund for an order.",
          {"order_id": ORDER_ID, "reason": {"type": "string", "enum": REASONS}}),
    _tool("escalate", "Hand an order to a human agent.",
          {"order_id": ORDER_ID, "priority": {"type": "string", "enum": PRIORITIES}}),
    _tool("transfer", "Hand the chat to a team.", {"team": {"type": "string", "enum": TEAMS}}),
]
WHERE = ["Where is my order {o}?", "Has order {o} shipped yet?", "Can you track order {o} for me?"]
REFUND = ["I want a refund for order {o}, it arrived {r}.", "Order {o} came {r}; please refund it."]
ESCALATE = {
    "high": ["Order {o} is urgent, I need a person now.", "Please get a human on order {o} right away!"],
    "normal": ["Can a person look at order {o}?", "I would like an agent to check order {o}."],
    "low": ["No rush, but can someone check order {o}?", "When you have time, have an agent look at order {o}."],
}
TRANSFER = {
    "billing": ["I was charged twice this month.", "Why is there an extra fee on my card?"],
    "shipping": ["The courier left my parcel at the wrong door.", "How long does delivery take to my town?"],
    "returns": ["How do I send something back?", "I need a label to return a jacket."],
}
STATUS = ["shipped", "in transit", "delivered"]


def _turns(call_id: str, question: str, name: str, arguments: dict[str, str], result: dict[str, str],
           answer: str) -> list[dict[str, object]]:
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]


def conversation(rng: random.Random, i: int) -> dict[str, object]:
    order = f"#{rng.randint(0, 999):03d}"
    messages: list[dict[str, object]] = []
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?", "weight": 0}]
    call_id = f"call_{i}"
    kind = rng.random()
    if kind < 0.3:
        status = rng.choice(STATUS)
        messages += _turns(call_id, rng.choice(WHERE).format(o=order), "lookup_order", {"order_id": order},
                           {"order_id": order, "status": status}, f"Order {order} is {status}.")
    elif kind < 0.55:
        reason = rng.choice(REASONS)
        messages += _turns(call_id, rng.choice(REFUND).format(o=order, r=reason), "start_refund",
                           {"order_id": order, "reason": reason}, {"refund": "started"},
                           f"The refund for order {order} has started.")
    elif kind < 0.8:
        priority = rng.choice(PRIORITIES)
        messages += _turns(call_id, rng.choice(ESCALATE[priority]).format(o=order), "escalate",
                           {"order_id": order, "priority": priority}, {"ticket": "open"},
                           f"An agent will look at order {order}.")
    else:
        team = rng.choice(TEAMS)
        messages += _turns(call_id, rng.choice(TRANSFER[team]), "transfer", {"team": team}, {"queue": team},
                           f"The {team} team will answer you here.")
    return {"messages": messages, "tools": TOOLS}


def preference_pair(row: dict[str, object], rng: random.Random) -> dict[str, object]:
    """A DPO pair from a conversation: at its tool call, the right call chosen, a wrong one rejected.

    The rejected call names another tool with the same arguments (the mistake the tuned
    model is to unlearn: the wrong function), in TRL's conversational preference format.
    """
    messages = row["messages"]
    assert isinstance(messages, list)
    at = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
    chosen = messages[at]
    call = chosen["tool_calls"][0]
    wrong = rng.choice([t["function"]["name"] for t in TOOLS if t["function"]["name"] != call["function"]["name"]])
    rejected = {"role": "assistant", "content": "", "tool_calls": [{**call, "function": {**call["function"], "name": wrong}}]}
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:at]]
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": row["tools"]}


def main() -> None:
    rng = random.Random(SEED)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    pairs_rng = random.Random(SEED + 1)  # its own stream: the conversations stay as they were
    for name, count, offset in (("train", N_TRAIN, 0), ("eval", N_EVAL, N_TRAIN)):
        rows = [conversation(rng, offset + i) for i in range(count)]
        (OUT_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pairs = [preference_pair(r, pairs_rng) for r in rows]
        (OUT_DIR / f"preferences-{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


if __name__ == "__main__":
    main()
