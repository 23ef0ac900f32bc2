"""Constrained decoding: JSON schemas and grammars compiled into per-sequence `TokenGuide`s.

Uses llguidance (the grammar library vLLM, SGLang and llama.cpp use too), chosen over
xgrammar and outlines-core by measurement (``bench/constrained_decoding.py``, BENCHMARKS.md):
on the tiny model it covers the same schemas as xgrammar with the same mask cost and
compiles faster, needs no runtime dependencies (xgrammar pulls triton and tvm-ffi), and
outlines-core compiled a recursive schema in 5 s and masks 8x slower.

A guide allows the model's stop tokens exactly when the grammar accepts (llguidance
treats the tokenizer's EOS ids so), so a constrained answer ends on a complete document,
or runs out of ``max_tokens`` (then ``finish_reason`` says ``length``, as at OpenAI).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import TokenGuide

logger = logging.getLogger(__name__)

# One space after `:` and `,` (as json.dumps and Jinja's `tojson` write it, so as chat templates
# render tool calls and models learn JSON) and no other whitespace: free whitespace lets a weak
# model spend its whole token budget on blanks and never close the document.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuideCompiler:
    """Compiles constraints for one tokenizer; each compiled constraint makes fresh guides.

    Args:
        tokenizer: the model's fast Hugging Face tokenizer.
        stop_ids: the tokens that end a turn (the engine's EOS set).
        vocab_size: the width of the model's logits (may exceed the tokenizer's length).
    """

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int], vocab_size: int) -> None:
        import llguidance.hf

        self.stop_ids = sorted(set(stop_ids))
        self.vocab_size = vocab_size
        # Expensive (~1 s on large vocabularies): one per engine, built at start.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.stop_ids)
        # Control tokens such as Mistral's [TOOL_CALLS]: a grammar's literal of the same text matches
        # only the spelled-out bytes, so `lark` lets the token itself match too.
        self._special = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}

    def json_schema(self, schema: dict[str, Any] | None, *, param: str) -> Callable[[], TokenGuide]:
        """Guides that allow only JSON documents valid under ``schema`` (None: any JSON object).

        Raises:
            ForgelineError: ``invalid_request`` naming ``param`` when the schema cannot be compiled.
        """
        import llguidance

        target = {"type": "object"} if schema is None else schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(target, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise _refused(param, str(exc)) from exc
        return self._compile(grammar, param)

    def lark(self, grammar: str, *, param: str) -> Callable[[], TokenGuide]:
        """Guides for a Lark grammar (llguidance's dialect: ``%json {schema}`` embeds a JSON schema).

        A quoted literal that is the text of one of the tokenizer's special tokens also matches
        that token (a model emits ``[TOOL_CALLS]`` as its control token, not as spelled-out text).

        Raises:
            ForgelineError: ``invalid_request`` naming ``param`` when the grammar cannot be compiled.
        """
        import llguidance

        for text, token_id in self._special.items():
            literal = json.dumps(text)
            if literal in grammar:
                grammar = grammar.replace(literal, f"({literal} | <[{token_id}]>)")
        return self._compile(llguidance.LLMatcher.grammar_from_lark(grammar), param)

    def _compile(self, grammar: str, param: str) -> Callable[[], TokenGuide]:
        import llguidance

        # Validating compiles the grammar once, so a bad schema is a 400 before any decoding.
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise _refused(param, error)

        def make() -> TokenGuide:
            return LLGuide(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0), self.stop_ids)

        return make


def _refused(param: str, reason: str) -> ForgelineError:
    first = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
    return ForgelineError(
        f"`{param}` cannot be used for constrained decoding: {first[:300]}; fix: simplify the schema "
        "(look-around in `pattern` and unknown keywords are not supported)",
        code=ErrorCode.INVALID_REQUEST,
        param=param,
    )


class LLGuide:
    """One sequence's llguidance matcher behind the engine's `TokenGuide` seam."""

    def __init__(self, matcher: Any, stop_ids: list[int]) -> None:
        self._matcher = matcher
        self._stop_ids = stop_ids

    def mask(self, logits: Any) -> None:
        """Set every token the grammar does not allow next to ``-inf`` (stop tokens only once it accepts)."""
        import numpy as np
        import torch

        raw = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(raw, bitorder="little")[: logits.shape[-1]]
        if not allowed.any():
            # A matcher in an error state allows nothing (cannot happen for tokens from its own
            # mask): end the sequence on a stop token rather than sample from all -inf.
            logger.warning("constrained decoding matcher failed: %s", self._matcher.get_error())
            allowed[[t for t in self._stop_ids if t < allowed.shape[0]]] = 1
        blocked = torch.from_numpy(allowed == 0).to(logits.device)
        logits.masked_fill_(blocked, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance the matcher past ``token``."""
        self._matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        """Whether what was generated so far is a complete document."""
        return bool(self._matcher.is_accepting())


def schema_of_response_format(response_format: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The JSON schema a chat ``response_format`` asks for (None: any JSON object), and the field to blame.

    Raises:
        ForgelineError: ``invalid_request`` for an unknown type or a ``json_schema`` without a schema.
    """
    kind = response_format.get("type")
    if kind == "json_object":
        return None, "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ForgelineError(
                "`response_format.json_schema` needs `schema`, a JSON schema object; "
                'send {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                code=ErrorCode.INVALID_REQUEST,
                param="response_format.json_schema",
            )
        return schema, "response_format.json_schema"
    raise ForgelineError(
        f"`response_format` type {json.dumps(kind)} is not supported; use text, json_object or json_schema",
        code=ErrorCode.INVALID_REQUEST,
        param="response_format",
    )
