"""One-line error rendering shared by the CLI's command groups (``jobs``, ``keys``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from registry.errors import ErrorCode, ForgelineError

err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Bad input exits 2 (like `forgeline validate`); a refused or failed operation exits 1.
USAGE_CODES = frozenset({ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_CONFIG})


def one_line_errors(fn: F) -> F:
    """Print a ``ForgelineError`` as one escaped line and exit 2 (bad input) or 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ForgelineError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if err.code in USAGE_CODES else 1) from None

    return wrapper  # type: ignore[return-value]
