"""What every ``forgeline`` command group shares: one console, one error decorator with one
exit-code table, and the registry.

Every ``cli_*`` module is a self-contained Typer app that imports from here, never from
``forgeline.cli``; ``forgeline.cli`` adds them all (so no module decorates another's app).

Exit codes: 0 done; 2 bad input (a recipe or option that fails validation, an invalid
request — fix the input and rerun); 1 a refused or failed operation (a policy refusal, a
conflict, a missing model, a failed job).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from registry.errors import ConfigError, ErrorCode, ForgelineError

console = Console(stderr=False)
err_console = Console(stderr=True)
state = {"debug": False}
"""Set by ``forgeline --debug``: errors then raise with their traceback."""

F = TypeVar("F", bound=Callable[..., Any])

USAGE_CODES = frozenset({ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_CONFIG})


def exit_code(error: ForgelineError) -> int:
    """2 for bad input, 1 for anything else (see the module docstring)."""
    return 2 if isinstance(error, ConfigError) or error.code in USAGE_CODES else 1


def print_error(error: ForgelineError, prefix: str = "") -> None:
    """One escaped line on stderr: ``error: <prefix><message>``."""
    err_console.print(f"[bold red]error:[/] {prefix}{escape(str(error))}", highlight=False, soft_wrap=True)


def handles_errors(fn: F) -> F:
    """Render a ``ForgelineError`` as one line and exit with :func:`exit_code` (``--debug`` re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ForgelineError as err:
            if state["debug"]:
                raise
            print_error(err)
            raise typer.Exit(exit_code(err)) from None

    return wrapper  # type: ignore[return-value]


def open_registry() -> Any:
    """The registry from the environment (imported late: MLflow is slow to import)."""
    from registry.client import Registry

    return Registry()
