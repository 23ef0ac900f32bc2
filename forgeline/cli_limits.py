"""The HTTP server limit flags shared by ``forgeline serve`` and ``forgeline control serve``."""

from __future__ import annotations

from typing import Annotated

import typer

from serving.config import ServerLimits

_DEFAULT = ServerLimits()

HeaderTimeout = Annotated[
    float | None,
    typer.Option("--header-timeout", help=f"Seconds a request's headers may take to arrive (default {_DEFAULT.header_timeout_s:g})."),
]
BodyTimeout = Annotated[
    float | None,
    typer.Option("--body-timeout", help=f"Longest pause in a request body, in seconds (default {_DEFAULT.body_timeout_s:g})."),
]
KeepAlive = Annotated[
    float | None,
    typer.Option("--keep-alive", help=f"Seconds an idle keep-alive connection stays open (default {_DEFAULT.keep_alive_s:g})."),
]
MaxConnections = Annotated[
    int | None,
    typer.Option("--max-connections", help=f"Open connections (and requests) at most; more get 503 (default {_DEFAULT.max_connections})."),
]
GracefulShutdown = Annotated[
    float | None,
    typer.Option(
        "--graceful-shutdown",
        help=f"On SIGTERM, seconds running requests and streams get to finish before the server stops (default {_DEFAULT.graceful_shutdown_s:g}).",
    ),
]


def server_limits(
    base: ServerLimits | None = None,
    *,
    header_timeout: float | None = None,
    body_timeout: float | None = None,
    keep_alive: float | None = None,
    max_connections: int | None = None,
    graceful_shutdown: float | None = None,
) -> ServerLimits:
    """``base`` (a recipe's ``serve.limits``, or the defaults) with the flags that were given."""
    given = {
        "header_timeout_s": header_timeout,
        "body_timeout_s": body_timeout,
        "keep_alive_s": keep_alive,
        "max_connections": max_connections,
        "graceful_shutdown_s": graceful_shutdown,
    }
    merged = (base or ServerLimits()).model_dump() | {k: v for k, v in given.items() if v is not None}
    return ServerLimits.model_validate(merged)
