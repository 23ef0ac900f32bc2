"""Reinforcement fine-tuning graders, mapped onto forgeline's verifiable rewards (GRPO).

Offered, because they run without calling out or executing request-supplied code:

- OpenAI's ``string_check`` with ``operation`` ``eq`` or ``ilike`` and
  ``reference: "{{item.FIELD}}"`` → the ``exact_match`` reward against ``FIELD``
  (compared after trimming and lower-casing; ``eq`` is therefore case-insensitive here).
- forgeline's own ``{"type": "forgeline", "rewards": [{"name", "weight", "field"}]}`` with
  the built-in rewards (``exact_match``, ``numeric_match``, ``r1_format``, ``json_valid``).

Refused with the reason: ``python`` (runs code from the request on the cluster),
``score_model`` / ``label_model`` (call a hosted model), ``text_similarity`` and ``multi``
(not mapped yet).
"""

from __future__ import annotations

import re
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from training.config import BUILTIN_REWARDS, RewardSpec

_ITEM_FIELD = re.compile(r"^\{\{\s*item\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")
_PARAM = "method.reinforcement.grader"


def _invalid(message: str, param: str = _PARAM) -> ForgelineError:
    return ForgelineError(message, code=ErrorCode.INVALID_REQUEST, param=param)


def _string_check(grader: dict[str, Any]) -> list[RewardSpec]:
    operation = grader.get("operation")
    if operation not in ("eq", "ilike"):
        raise _invalid(f"{_PARAM}.operation: {operation!r} is not offered; fix: use 'eq' or 'ilike'", f"{_PARAM}.operation")
    reference = str(grader.get("reference", ""))
    match = _ITEM_FIELD.match(reference)
    if not match:
        raise _invalid(
            f"{_PARAM}.reference: {reference!r} is not a row field; fix: write it as '{{{{item.reference_answer}}}}' "
            "naming a field of every training row",
            f"{_PARAM}.reference",
        )
    answer_input = str(grader.get("input", "{{sample.output_text}}")).replace(" ", "")
    if answer_input != "{{sample.output_text}}":
        raise _invalid(f"{_PARAM}.input: only '{{{{sample.output_text}}}}' is offered, not {grader.get('input')!r}",
                       f"{_PARAM}.input")
    return [RewardSpec(name="exact_match", field=match.group(1))]


def _forgeline(grader: dict[str, Any]) -> list[RewardSpec]:
    rewards = grader.get("rewards")
    if not isinstance(rewards, list) or not rewards:
        raise _invalid(f"{_PARAM}.rewards: give a non-empty list of {{name, weight, field}}", f"{_PARAM}.rewards")
    specs = []
    for i, reward in enumerate(rewards):
        name = reward.get("name") if isinstance(reward, dict) else None
        if name not in BUILTIN_REWARDS:
            raise _invalid(
                f"{_PARAM}.rewards[{i}].name: {name!r} is not a built-in reward; fix: use one of "
                f"{', '.join(BUILTIN_REWARDS)} (your own reward functions go in a recipe, not an API request)",
                f"{_PARAM}.rewards[{i}].name",
            )
        try:
            specs.append(RewardSpec.model_validate(reward))
        except ValueError as err:
            raise _invalid(f"{_PARAM}.rewards[{i}]: {err}", f"{_PARAM}.rewards[{i}]") from None
    return specs


_REFUSED = {
    "python": "runs code from the request on the training cluster",
    "score_model": "calls a hosted model",
    "label_model": "calls a hosted model",
    "text_similarity": "is not mapped onto a forgeline reward yet",
    "multi": "is not mapped onto forgeline rewards yet",
}


def rewards_for(grader: dict[str, Any], reference_fields: tuple[str, ...]) -> list[RewardSpec]:
    """The GRPO rewards for ``grader``, checked against the fields every training row has.

    Raises:
        ForgelineError: the grader is not offered, malformed, or reads a field some rows lack
            (``invalid_request``, ``param`` naming the grader field).
    """
    kind = grader.get("type")
    if kind == "string_check":
        specs = _string_check(grader)
    elif kind == "forgeline":
        specs = _forgeline(grader)
    elif kind in _REFUSED:
        raise _invalid(f"{_PARAM}.type: {kind!r} {_REFUSED[kind]}; fix: use a 'string_check' grader or "
                       "{'type': 'forgeline', 'rewards': [...]} with built-in rewards", f"{_PARAM}.type")
    else:
        raise _invalid(f"{_PARAM}.type: unknown grader {kind!r}; fix: use 'string_check' or 'forgeline'", f"{_PARAM}.type")
    for spec in specs:
        field = spec.reference_field()
        if field and field not in reference_fields:
            have = ", ".join(reference_fields) or "none"
            raise _invalid(
                f"{_PARAM}: reward {spec.name} reads row field {field!r}, but not every training row has it "
                f"(fields on every row: {have}); fix: add it to every row or point the grader at one of those",
            )
    return specs
