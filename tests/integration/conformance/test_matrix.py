"""The conformance matrix: model family × method × adapter through every stage a user runs.

validate → train (+ track, register) → evaluate → promote → build → serve → the stock
``openai`` SDK, with forgeline's own entry points (`stages.run_cell`) on tiny random-weight
checkpoints of each family (`tests.support.families`). LoRA cells also serve the version by
its own name on its bare base (adapter routed onto the base, the ``forgeline serve --base``
path) and alternate adapter and base requests, so one request cannot poison the next.

A cell that forgeline does not support must be refused at ``validate`` with a clear error
(checked through the CLI too: exit 2, one line, no traceback) — never a traceback later.

Which cells run where
---------------------
``make test`` runs DEFAULT (one cell per code path, ~3-5 min on 2 cores): every family at
least once end to end, each method, full fine-tunes, GRPO, the MoE adapter path, Conv1D,
fused projections, and every validate refusal. ``make test-conformance`` (``-m
conformance_full``) adds the rest of family × {sft, dpo, grpo} × {lora, none}: they repeat
code paths DEFAULT covers (same trainer, same merge, same engine) on other architectures, so
they are left out of CI for time. QLoRA runs only where a CUDA GPU exists (``gpu``); on CPU
the QLoRA cell checks that validate refuses it. GPT-2 ships no chat template: its cells give
``model.chat_template`` in the recipe, and one cell checks validate refuses it without one.
Qwen2-MoE cells target attention and the shared MLP by name (``all-linear`` would leave the
fused routed experts unadapted, which validate refuses — see the refused cells).

The matrix (stages: V validate, T train, E evaluate, P promote, B build, S serve + openai
SDK, N served by name on its bare base, adapter and base requests alternating; ✓ pass,
R refused at validate with a clear error, — not applicable):

=============================  ===  ===  ===  ===  ===  ===  ===
cell                           V    T    E    P    B    S    N
=============================  ===  ===  ===  ===  ===  ===  ===
llama3 sft lora                ✓    ✓    ✓    ✓    ✓    ✓    ✓
qwen2 dpo lora                 ✓    ✓    ✓    ✓    ✓    ✓    ✓
qwen2_moe sft lora             ✓    ✓    ✓    ✓    ✓    ✓    ✓
mixtral grpo lora (rewards)    ✓    ✓    ✓    ✓    ✓    ✓    ✓
gemma2 sft lora                ✓    ✓    ✓    ✓    ✓    ✓    ✓
phi3 sft none (full weights)   ✓    ✓    ✓    ✓    ✓    ✓    —
gpt2 sft lora +template        ✓    ✓    ✓    ✓    ✓    ✓    ✓
gpt2 sft lora, no template     R (no chat template: set model.chat_template)
qwen2_moe lora all-linear      R (the routed experts would stay unadapted)
llama3 lora lm_head target     R (lm_head cannot take LoRA)
llama3 sft qlora, CPU          R (qlora needs a CUDA GPU)
qwen2 sft qlora, GPU           gpu: the full path where a GPU exists (not run on CPU machines)
=============================  ===  ===  ===  ===  ===  ===  ===

The full set (``-m conformance_full``) runs the other 35 family × method × adapter cells
through the same stages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from registry import lineage
from tests.integration.conformance.stages import REPO, Cell, run_cell, serve_by_name, validate, write_recipe
from tests.support.families import FAMILIES, family

pytestmark = [pytest.mark.integration]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# MoE cells name their linear layers: `all-linear` silently skips the routed experts (3-D expert
# tensors in transformers 5), which validate should flag (its own cell below). Qwen2-MoE's shared
# expert is a plain MLP that sees flattened tokens, the path that breaks mixed adapter batches.
MOE_TARGETS = {"qwen2_moe": (*ATTENTION, "gate_proj", "up_proj", "down_proj"), "mixtral": ATTENTION}


@dataclass(frozen=True)
class Expect:
    """What a cell should show.

    Attributes:
        refused: the cell is unsupported: validate must refuse it with an error matching this regex.
        targets: LoRA target modules for the recipe.
    """

    refused: str | None = None
    targets: str | tuple[str, ...] = "all-linear"


def expect_for(cell: Cell) -> Expect:
    """The expectation of a regular cell of the matrix: every stage passes."""
    return Expect(targets=MOE_TARGETS.get(cell.family, "all-linear"))


def _param(cell: Cell, expect: Expect | None = None, *marks: Any) -> Any:
    expect = expect or expect_for(cell)
    return pytest.param(cell, expect, marks=list(marks), id=cell.id)


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the QLoRA cell trains instead")

DEFAULT = [
    _param(Cell("llama3", "sft", "lora")),
    _param(Cell("qwen2", "dpo", "lora")),
    _param(Cell("qwen2_moe", "sft", "lora")),
    _param(Cell("mixtral", "grpo", "lora")),
    _param(Cell("gemma2", "sft", "lora")),
    _param(Cell("phi3", "sft", "none")),
    _param(Cell("gpt2", "sft", "lora", chat_template=True)),
    # Refused at validate with a clear error.
    _param(Cell("gpt2", "sft", "lora"), Expect(refused=r"(?i)chat template")),
    _param(Cell("qwen2_moe", "sft", "lora", variant="all-linear"), Expect(refused=r"(?i)expert")),
    _param(Cell("llama3", "sft", "lora", variant="lm_head"), Expect(refused=r"lm_head", targets=("q_proj", "lm_head"))),
    _param(Cell("llama3", "sft", "qlora"), Expect(refused=r"(?i)qlora.*(gpu|cuda)|bitsandbytes"), NO_GPU),
    _param(Cell("qwen2", "sft", "qlora"), None, *GPU),
]
_DEFAULT_IDS = {p.id for p in DEFAULT}
FULL = [
    _param(cell, None, pytest.mark.conformance_full, pytest.mark.slow)
    for name in FAMILIES
    for method in ("sft", "dpo", "grpo")
    for adapter in ("lora", "none")
    if (cell := Cell(name, method, adapter, chat_template=name == "gpt2")).id not in _DEFAULT_IDS
]


def _cli_validate(recipe: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "forgeline", "validate", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize(("cell", "expect"), [*DEFAULT, *FULL])
def test_cell(cell: Cell, expect: Expect, family_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    from registry.client import Registry
    from registry.errors import ConfigError

    base = family_checkpoint(cell.family)
    overrides = {"adapter": {"target_modules": list(expect.targets) if isinstance(expect.targets, tuple) else expect.targets}}
    if cell.adapter == "none":
        overrides = {}

    if expect.refused is not None:
        recipe = write_recipe(cell, base, tmp_path, overrides=overrides)
        try:
            validate(recipe)
        except ConfigError as err:
            assert re.search(expect.refused, str(err)), str(err)
        else:
            pytest.fail(f"validate accepted {cell.id}, which forgeline does not support")
        result = _cli_validate(recipe)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "error" in result.stderr
        return

    run = run_cell(cell, base, tmp_path, overrides=overrides)
    assert run.reached[-1] == "openai"

    registry = Registry()
    info = registry.get_version(run.recipe.name, run.version)
    assert (info.tags[lineage.METHOD], info.tags[lineage.ADAPTER]) == (cell.method, cell.adapter)

    # evaluate recorded task metrics on the version and its base (better_than_base reads both).
    assert run.metrics and run.base_metrics
    if cell.method == "grpo":
        assert any("reward" in key for key in run.metrics), run.metrics
    else:
        assert {"accuracy", "eval_loss"} <= run.metrics.keys() and {"accuracy", "eval_loss"} <= info.metrics().keys()
    holder = registry.alias_holder(run.recipe.name, "production")
    assert holder is not None and holder.version == run.version

    # The engine artifact carries the family's every stop token (one source of truth for serving).
    assert run.engine_dir is not None and (run.engine_dir / "forgeline-engine.json").is_file()
    tokenizer_stops = {_token_id(base, t) for t in family(cell.family).stop}
    eos = json.loads((run.engine_dir / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == tokenizer_stops

    # Both refs answered through the stock SDK, with the version named in the response header.
    by_alias, by_version = (r.parse() for r in run.replies)
    for raw in run.replies:
        assert raw.headers["x-forgeline-model-version"] == f"{run.recipe.name}/{run.version}"
    for reply in (by_alias, by_version):
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
    assert by_alias.choices[0].message.content == by_version.choices[0].message.content  # greedy, same weights

    if cell.adapter in ("lora", "qlora"):
        replies = serve_by_name(run, base)
        assert [r.status_code for r in replies] == [200] * len(replies)
        adapter, bare = replies[0].headers, replies[1].headers
        assert adapter.get("x-forgeline-adapter") == f"{run.recipe.name}@{run.version}"
        assert "x-forgeline-adapter" not in bare and bare["x-forgeline-model-version"].endswith("/base")


def _token_id(folder: Path, token: str) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token))
