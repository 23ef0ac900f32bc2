"""Benchmark 8: what constrained decoding costs per token, and how the grammar libraries compare.

Part 1, the engine (same run, alternating rounds): `TorchEngine` on a random Llama of the
tiny base's shape (~1M parameters; random so it never stops early: every row decodes
``max_tokens``) decodes ``requests`` concurrent requests, free and with a ``json_schema``
guide (`serving.engine.grammar`) whose document cannot close within ``max_tokens``, at
temperature 1; the figure is seconds per generated token, constrained over free. The
guide's own time (mask + accept) is measured inside the run too.

Part 2, the libraries (each importable one of llguidance, xgrammar, outlines-core): on the
tiny base's tokenizer, compile each schema of `SCHEMAS` (coverage: how many compile),
then walk each with random logits through the grammar and time the mask and the advance
per token. Only llguidance is a dependency; install the others beside it to compare
(``pip install --target DIR xgrammar apache-tvm-ffi outlines-core`` and ``PYTHONPATH=DIR``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.models import TINY_BASE, build_llama
from bench.stats import spread

logger = logging.getLogger(__name__)

NAME = "constrained_decoding"

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"requests": 2, "max_tokens": 8, "rounds": 1, "walk_steps": 16},
    "full": {"requests": 8, "max_tokens": 64, "rounds": 5, "walk_steps": 64},
}

# Long enough that no document closes within max_tokens: both sides decode the same number of steps.
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["shipped", "pending", "lost"]},
        "items": {"type": "array", "minItems": 50, "items": {
            "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"], "additionalProperties": False}},
    },
    "required": ["status", "items"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"status": {"enum": ["shipped", "pending", "lost"]}}, "required": ["status"], "additionalProperties": False},
    "nested_array": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 3}}, "required": ["items"], "additionalProperties": False},
    "anyOf": {"type": "object", "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}}, "required": ["v"], "additionalProperties": False},
    "ref": {"$defs": {"addr": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}, "type": "object", "properties": {"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}}, "required": ["home", "work"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["order_id"], "additionalProperties": False},
    "string_len": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 8}}, "required": ["s"], "additionalProperties": False},
    "format_date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"], "additionalProperties": False},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "const_oneOf": {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind", "x"], "additionalProperties": False}, {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string"}}, "required": ["kind", "y"], "additionalProperties": False}]},
    "json_object": {"type": "object"},
}


# -- part 1: the engine ------------------------------------------------------------------------


class _Timed:
    """Wraps a guide and adds its mask and accept time to a shared counter."""

    def __init__(self, guide: Any, spent: list[float]) -> None:
        self._guide, self._spent = guide, spent

    def mask(self, logits: Any) -> None:
        t0 = time.perf_counter()
        self._guide.mask(logits)
        self._spent[0] += time.perf_counter() - t0
        self._spent[1] += 1

    def accept(self, token: int) -> None:
        t0 = time.perf_counter()
        self._guide.accept(token)
        self._spent[0] += time.perf_counter() - t0


async def _burst(engine: Any, prompt: str, params: Any, requests: int) -> tuple[int, float]:
    t0 = time.perf_counter()

    async def one(seed: int) -> int:
        from dataclasses import replace

        return sum([len(c.token_ids) async for c in engine.generate(prompt, replace(params, seed=seed))])

    tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    return tokens, time.perf_counter() - t0


def run_engine(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Seconds per token, free vs constrained, alternating rounds on one engine."""
    from serving.engine.base import SamplingParams
    from serving.engine.torch_engine import TorchEngine

    folder = build_llama(work / "tiny-random", "tiny")
    engine = TorchEngine(folder, device="cpu", model_id="tiny-random", batch_window_ms=20.0)
    asyncio.run(engine.start())
    try:
        make = engine.guide_compiler().json_schema(ORDER_SCHEMA, param="response_format.json_schema")
        spent = [0.0, 0]
        free = SamplingParams(max_tokens=cfg["max_tokens"], temperature=1.0)
        guided = SamplingParams(max_tokens=cfg["max_tokens"], temperature=1.0, guide=lambda: _Timed(make(), spent))
        prompt = "Answer in JSON: where is order 28589?"
        asyncio.run(_burst(engine, prompt, free, cfg["requests"]))  # warm-up
        ratios, free_ms, guided_ms, guide_us = [], [], [], []
        for _ in range(cfg["rounds"]):
            n_free, t_free = asyncio.run(_burst(engine, prompt, free, cfg["requests"]))
            spent[0], spent[1] = 0.0, 0
            n_guided, t_guided = asyncio.run(_burst(engine, prompt, guided, cfg["requests"]))
            if n_free != n_guided:
                logger.warning("unequal lengths: %d free vs %d constrained tokens", n_free, n_guided)
            per_free, per_guided = t_free / max(n_free, 1), t_guided / max(n_guided, 1)
            free_ms.append(per_free * 1000)
            guided_ms.append(per_guided * 1000)
            ratios.append(per_guided / per_free)
            guide_us.append(spent[0] / max(spent[1], 1) * 1e6)
        return {
            "model": "random Llama, tiny-base shape",
            "requests": cfg["requests"],
            "max_tokens": cfg["max_tokens"],
            "tokens_per_burst": {"free": n_free, "constrained": n_guided},
            "ms_per_token_free": spread(free_ms),
            "ms_per_token_constrained": spread(guided_ms),
            "constrained_over_free": spread(ratios),
            "guide_us_per_token_per_row": spread(guide_us),
        }
    finally:
        asyncio.run(engine.stop())


# -- part 2: the libraries ---------------------------------------------------------------------


def _library(name: str, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(make matcher from schema, mask fn of matcher, accept fn of matcher) for library ``name``."""
    import numpy as np
    import torch

    vocab = len(tokenizer)
    eos = [tokenizer.eos_token_id]
    if name == "llguidance":
        import llguidance
        import llguidance.hf

        lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

        def make(schema: dict[str, Any]) -> Any:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(matcher.get_error())
            return matcher

        def mask(m: Any, logits: Any) -> None:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:vocab]
            logits.masked_fill_(torch.from_numpy(bits == 0), float("-inf"))

        return make, mask, lambda m, t: m.consume_token(t)
    if name == "xgrammar":
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def make_x(schema: dict[str, Any]) -> Any:
            return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True))

        def mask_x(m: Any, logits: Any) -> None:
            m.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)

        return make_x, mask_x, lambda m, t: m.accept_token(t)
    if name == "outlines_core":
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        byte_of = _byte_level_decoder()
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in tokenizer.get_vocab().items():
            if token_id in eos:
                continue
            raw = bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else text.encode()
            tokens.setdefault(raw, []).append(token_id)
        voc = Vocabulary(eos[0], tokens)

        class _State:
            def __init__(self, index: Any) -> None:
                self.index, self.state = index, index.get_initial_state()

        def make_o(schema: dict[str, Any]) -> Any:
            return _State(Index(build_regex_from_schema(json.dumps(schema)), voc))

        def mask_o(m: Any, logits: Any) -> None:
            blocked = torch.ones(vocab, dtype=torch.bool)
            blocked[torch.tensor(m.index.get_allowed_tokens(m.state))] = False
            logits.masked_fill_(blocked, float("-inf"))

        def accept_o(m: Any, t: int) -> None:
            if t not in eos:
                m.state = m.index.get_next_state(m.state, t)

        return make_o, mask_o, accept_o
    raise ValueError(name)


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's byte-to-unicode table, inverted: byte-level BPE token text -> bytes.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def run_libraries(cfg: dict[str, Any]) -> dict[str, Any]:
    """Coverage, compile time and per-token mask/accept time of each importable library."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    out: dict[str, Any] = {}
    for name in ("llguidance", "xgrammar", "outlines_core"):
        if importlib.util.find_spec(name) is None:
            out[name] = {"skipped": "not installed"}
            continue
        make, mask, accept = _library(name, tokenizer)
        compiled, compile_ms, failures = 0, [], []
        steps, mask_s, accept_s = 0, 0.0, 0.0
        for label, schema in SCHEMAS.items():
            try:
                t0 = time.perf_counter()
                matcher = make(schema)
                compile_ms.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # noqa: BLE001 - a schema the library refuses is the measurement
                failures.append(f"{label}: {str(exc)[:80]}")
                continue
            compiled += 1
            rng = torch.Generator().manual_seed(0)
            logits = torch.empty(len(tokenizer))
            for _ in range(cfg["walk_steps"]):
                logits.normal_(generator=rng)
                t0 = time.perf_counter()
                mask(matcher, logits)
                t1 = time.perf_counter()
                token = int(torch.argmax(logits))
                accept(matcher, token)
                accept_s += time.perf_counter() - t1
                mask_s += t1 - t0
                steps += 1
                if token == tokenizer.eos_token_id:
                    break
        out[name] = {
            "coverage": f"{compiled}/{len(SCHEMAS)}",
            "compile_ms_median": round(sorted(compile_ms)[len(compile_ms) // 2], 2) if compile_ms else None,
            "compile_ms_max": round(max(compile_ms), 1) if compile_ms else None,
            "mask_us_per_token": round(mask_s / max(steps, 1) * 1e6, 1),
            "accept_us_per_token": round(accept_s / max(steps, 1) * 1e6, 1),
            "failures": failures,
        }
    return out


def run(setting: str, work: Path) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    return {"engine": run_engine(cfg, work), "libraries": run_libraries(cfg)}


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
