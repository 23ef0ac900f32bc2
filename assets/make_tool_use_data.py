"""Generate a small tool-use dataset in OpenAI's chat fine-tuning format (train/eval JSONL).

A support assistant has two tools, ``lookup_order(order_id)`` and ``start_refund(order_id,
reason)``. Each conversation: the customer asks about an order, the assistant calls the right
tool with the order number from the message, the tool answers, and the assistant tells the
customer. Some rows carry an earlier small-talk turn with ``weight: 0`` (context, not trained),
so the data exercises every part of the format: ``tools``, ``tool_calls``, ``tool`` results,
several assistant turns and per-message weights.

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

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Where an order is.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "start_refund", "description": "Start a refund for an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}, "reason": {"type": "string"}},
                       "required": ["order_id", "reason"]}}},
]
WHERE = ["Where is my order {o}?", "Has order {o} shipped yet?", "Can you track order {o} for me?"]
REFUND = ["I want a refund for order {o}, it arrived {r}.", "Order {o} came {r}; please refund it."]
REASONS = ["broken", "late", "damaged"]
STATUS = ["shipped", "in transit", "delivered"]


def conversation(rng: random.Random, i: int) -> dict[str, object]:
    order = str(rng.randint(10000, 99999))
    messages: list[dict[str, object]] = []
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?", "weight": 0}]
    call_id = f"call_{i}"
    if rng.random() < 0.5:
        status = rng.choice(STATUS)
        messages += [
            {"role": "user", "content": rng.choice(WHERE).format(o=order)},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "lookup_order", "arguments": json.dumps({"order_id": order})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"order_id": order, "status": status})},
            {"role": "assistant", "content": f"Order {order} is {status}."},
        ]
    else:
        reason = rng.choice(REASONS)
        messages += [
            {"role": "user", "content": rng.choice(REFUND).format(o=order, r=reason)},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "start_refund", "arguments": json.dumps({"order_id": order, "reason": reason})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"refund": "started"})},
            {"role": "assistant", "content": f"The refund for order {order} has started."},
        ]
    return {"messages": messages, "tools": TOOLS}


def main() -> None:
    rng = random.Random(SEED)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, count, offset in (("train", N_TRAIN, 0), ("eval", N_EVAL, N_TRAIN)):
        rows = [conversation(rng, offset + i) for i in range(count)]
        (OUT_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
