"""Fake ``tensorrt_llm`` (see ../README.md): version and a call log."""

from __future__ import annotations

import json
import os
from typing import Any

__version__ = os.environ.get("FAKE_TRTLLM_VERSION", "1.2.1")


def record(name: str, **kwargs: Any) -> None:
    """Append one call to ``$FAKE_TRTLLM_LOG``."""
    path = os.environ.get("FAKE_TRTLLM_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"call": name, "kwargs": kwargs}, default=str) + "\n")
