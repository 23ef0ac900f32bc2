"""The deployment templates in ``platform/`` (data, not code), rendered with Jinja2.

``platform/`` is not a Python package (it would shadow the standard library's ``platform``),
so templates are found next to the source tree, or in ``$FORGELINE_PLATFORM_DIR``.
"""

from __future__ import annotations

import os
import shlex
from functools import cache
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError


def platform_dir() -> Path:
    """The ``platform/`` folder that holds the Slurm and Kubernetes templates."""
    override = os.environ.get("FORGELINE_PLATFORM_DIR")
    folder = Path(override) if override else Path(__file__).resolve().parents[1] / "platform"
    if not folder.is_dir():
        raise ForgelineError(
            f"deployment templates not found in {folder}; fix: run from a forgeline checkout, "
            "or set FORGELINE_PLATFORM_DIR to its platform/ folder",
            code=ErrorCode.MISSING_DEPENDENCY,
            param="FORGELINE_PLATFORM_DIR",
        )
    return folder


@cache
def _environment(folder: str) -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, never an empty string in a script
        keep_trailing_newline=True,
        autoescape=False,  # shell scripts and YAML, not HTML
    )
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    return env


def render(template: str, **values: Any) -> str:
    """Render ``platform/<template>`` with ``values``."""
    return _environment(str(platform_dir())).get_template(template).render(**values)
