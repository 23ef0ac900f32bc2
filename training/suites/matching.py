"""How a generated answer is matched against the expected one: exactly, by pattern, or as a number."""

from __future__ import annotations

import math
import re

from ..evaluation import normalise

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def extracted(answer: str, pattern: str | None) -> str:
    """The part of ``answer`` that ``pattern`` picks (its first group, or the whole match); all of it without one."""
    if pattern is None:
        return answer
    found = re.search(pattern, answer, flags=re.IGNORECASE | re.DOTALL)
    if found is None:
        return ""
    return found.group(1) if found.groups() else found.group(0)


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    for token in reversed(_NUMBER.findall(text)):
        try:
            return float(token.replace(",", ""))
        except ValueError:
            continue
    return None


def matches(answer: str, expected: str, mode: str, *, extract: str | None = None, tolerance: float = 1e-6) -> bool:
    """Whether ``answer`` counts as ``expected`` under ``mode`` (``exact``, ``regex`` or ``numeric``).

    ``regex``: ``expected`` is a pattern the whole (stripped) answer must match, ignoring case.
    ``numeric``: the answer's last number is within ``tolerance`` of the expected one.
    """
    answer = extracted(answer, extract)
    if mode == "exact":
        return normalise(answer) == normalise(expected)
    if mode == "regex":
        try:
            return re.fullmatch(expected, answer.strip(), flags=re.IGNORECASE | re.DOTALL) is not None
        except re.error:
            return False  # a row whose pattern does not compile matches nothing
    if mode == "numeric":
        got, want = last_number(answer), last_number(expected)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance)
    raise ValueError(f"unknown match mode {mode!r}")
