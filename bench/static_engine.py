"""The static-batching PyTorch engine as it was before continuous batching (issue 16), for `bench/` only.

`bench/open_loop.py` and `bench/gpu_bench.py` measure the new engine against exactly the code
users ran before, in the same run. That code is read from git history at `BASELINE` rather
than kept as a second copy in the tree, where nothing would maintain it and every tool would
count it as duplicated logic. It imports today's `serving` modules it used then (adapter
chat, LoRA routing, token bytes, stop tokens), which keep those names for it.

Needs a clone that has `BASELINE` (not a shallow one): `available()` says whether it does.
"""

from __future__ import annotations

import subprocess
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "04a89dea8a0329804526f7a59bfa3f0d5ac7cfb4"
"""The last commit with the static engine (`serving/engine/torch_engine.py` before the split)."""
SOURCE = "serving/engine/torch_engine.py"


def _show() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASELINE}:{SOURCE}"], capture_output=True, text=True, check=False
    )


def available() -> bool:
    """Whether this checkout has the baseline commit (a shallow clone does not)."""
    return _show().returncode == 0


@cache
def _baseline() -> types.ModuleType:
    shown = _show()
    if shown.returncode != 0:
        raise RuntimeError(
            f"the static engine is read from git at {BASELINE[:10]}, which this checkout lacks "
            f"({shown.stderr.strip()}); fix: `git fetch --unshallow` (or clone without --depth)"
        )
    name = "bench._static_engine_baseline"
    module = types.ModuleType(name, "The engine at " + BASELINE[:10])
    module.__file__ = f"{BASELINE[:10]}:{SOURCE}"
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(shown.stdout, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own code, pinned by hash
    return module


def __getattr__(name: str) -> Any:
    if name == "StaticTorchEngine":
        return _baseline().TorchEngine
    raise AttributeError(name)
