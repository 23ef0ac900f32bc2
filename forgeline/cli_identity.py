"""Who a governance command acts as: an API key, or an explicit local admin; never ``$USER``.

- With a key (``FORGELINE_API_KEY`` or ``--api-key-file PATH``; ``--api-key`` still works
  but warns: a key on a command line is visible to every user in ``ps``), the command acts
  as the key's owner with the key's roles, through the control plane (``--server``) or on
  the local control database.
- Without a key, it acts on the local databases only as the *local admin* named by
  ``--local-admin NAME`` (or ``FORGELINE_LOCAL_ADMIN``); audit entries and approvals record
  the actor ``local-admin:NAME``. Whoever can write the local databases can change them
  anyway; the flag makes that explicit and traceable, and the no-self-approval rule still
  compares ``NAME`` with the version's trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from registry.authz import local_admin
from registry.errors import ErrorCode, ForgelineError

KEY_ENV = "FORGELINE_API_KEY"
LOCAL_ADMIN_ENV = "FORGELINE_LOCAL_ADMIN"

KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help=f"Deprecated (visible in `ps`; removed in 0.3): set {KEY_ENV} or use --api-key-file.",
        show_default=False,
    ),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option("--api-key-file", help=f"File holding your API key (fl-...); or set {KEY_ENV}.", show_default=False),
]
LocalAdminOpt = Annotated[
    str | None,
    typer.Option(
        "--local-admin",
        envvar=LOCAL_ADMIN_ENV,
        help="Act on the local databases without a key, as the local admin NAME (recorded as `local-admin:NAME`).",
        show_default=False,
    ),
]


def api_key(flag: str | None, file: Path | None) -> str | None:
    """The API key from ``--api-key-file``, ``$FORGELINE_API_KEY`` or (deprecated) ``--api-key``."""
    if flag:
        typer.echo(
            f"warning: --api-key puts your key on the command line, where `ps` shows it to every user; "
            f"set {KEY_ENV} or use --api-key-file instead (--api-key goes away in 0.3)",
            err=True,
        )
        return flag.strip()
    if file is not None:
        try:
            secret = file.read_text().strip()
        except OSError as exc:
            raise ForgelineError(
                f"--api-key-file: cannot read {file}: {exc.strerror}; fix: give a readable file holding the key",
                code=ErrorCode.INVALID_REQUEST,
                param="api_key_file",
            ) from None
        if not secret:
            raise ForgelineError(f"--api-key-file: {file} is empty", code=ErrorCode.INVALID_REQUEST, param="api_key_file")
        return secret
    return os.environ.get(KEY_ENV, "").strip() or None


def local_actor(name: str | None, command: str) -> str:
    """The actor of a local command run without a key: ``local-admin:NAME``.

    Raises:
        ForgelineError: no local admin was named (``invalid_api_key``, exit 1): the
            command will not guess an identity from the OS user.
    """
    if not name or not name.strip():
        raise ForgelineError(
            f"`forgeline {command}` without a key acts on the local databases only as an explicit local admin: "
            f"pass --local-admin NAME (or set {LOCAL_ADMIN_ENV}), or use your key ({KEY_ENV} or --api-key-file) "
            "with --server URL",
            code=ErrorCode.UNAUTHENTICATED,
            param="local_admin",
        )
    return local_admin(name.strip())
